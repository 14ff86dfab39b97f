{{/* The operator's name, used for its Deployment, ServiceAccount, RBAC and Lease. */}}
{{- define "forkscope.operator" -}}forkscope-operator{{- end -}}

{{- define "forkscope.labels" -}}
app.kubernetes.io/name: forkscope
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "forkscope.selector" -}}
app.kubernetes.io/name: forkscope
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Whether a monitor kind is wanted: "true", "false", or "auto" = when the API is served. */}}
{{- define "forkscope.monitor" -}}
{{- $want := toString .want -}}
{{- if eq $want "auto" -}}
{{- .root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}
{{- else -}}
{{- eq $want "true" -}}
{{- end -}}
{{- end -}}
