#!/usr/bin/env bash
# e2e/controlplane.sh: a real Kubernetes control plane (etcd + kube-apiserver) for forkscope's
# end-to-end tests, plus the client tools they drive (kubectl, helm, prometheus).
#
#   e2e/controlplane.sh build        build or install every binary once, cached by version
#   e2e/controlplane.sh start DIR    run etcd + kube-apiserver on 127.0.0.1 (random free ports,
#                                    TLS, client-certificate authn, RBAC); writes DIR/kubeconfig
#                                    and DIR/env; returns once /readyz answers ok
#   e2e/controlplane.sh stop DIR     stop exactly the processes `start DIR` started; remove DIR
#   e2e/controlplane.sh paths        print the cached binaries' paths (sh `export` lines)
#
# Binaries live in ${FORKSCOPE_CACHE:-$HOME/.cache/forkscope}/bin/NAME-VERSION. The Go builds
# use the Go module proxy as configured on the machine (GOPROXY) with GOFLAGS=-mod=mod.
# There is no kubelet, no scheduler and no controller manager: tests play kubelet themselves
# (see the kubelet harness in e2e/src/kubelet.rs).
set -euo pipefail

KUBE_VERSION=v1.33.13  # keep in step with e2e/controlplane/kube/go.mod
ETCD_VERSION=v3.5.21   # keep in step with e2e/controlplane/etcd/go.mod
HELM_VERSION=v3.22.0
PROMETHEUS_VERSION=v3.16.0
PROMETHEUS_MODULE=v0.316.0  # the Go module version of that release (github.com/prometheus/prometheus)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${FORKSCOPE_CACHE:-$HOME/.cache/forkscope}
BIN=$CACHE/bin

log() { printf 'controlplane: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

kube_apiserver_bin() { echo "$BIN/kube-apiserver-$KUBE_VERSION"; }
etcd_bin() { echo "$BIN/etcd-$ETCD_VERSION"; }
helm_bin() { echo "$BIN/helm-$HELM_VERSION"; }
prometheus_bin() { echo "$BIN/prometheus-$PROMETHEUS_VERSION"; }

# kubectl: the machine's own when its minor version is within the supported skew (±1) of the
# apiserver, else one built from the same kubernetes module as the apiserver
# (FORKSCOPE_SYSTEM_KUBECTL=0 forces the built one).
kubectl_ok() {
  local minor want=${KUBE_VERSION#v1.}
  want=${want%%.*}
  minor=$("$1" version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n1)
  [[ -n $minor ]] && ((minor >= want - 1 && minor <= want + 1))
}
kubectl_bin() {
  local system
  if [[ ${FORKSCOPE_SYSTEM_KUBECTL:-1} != 0 ]] && system=$(command -v kubectl) && kubectl_ok "$system"; then
    echo "$system"
  else
    echo "$BIN/kubectl-$KUBE_VERSION"
  fi
}

go_env() {
  # The machine's GOFLAGS (e.g. -buildvcs=false) plus -mod=mod, so go.sum is completed on
  # first use and the committed go.sum is honoured afterwards.
  GOFLAGS="$(go env GOFLAGS) -mod=mod" CGO_ENABLED=0 "$@"
}

# Version stamps that `kubectl version` and /version report (instead of v0.0.0).
kube_ldflags() {
  local v=${KUBE_VERSION#v} date
  date=$(go_env go list -m -json "k8s.io/kubernetes@$KUBE_VERSION" 2>/dev/null |
    sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' | head -n1)
  local flags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$KUBE_VERSION"
    flags+=" -X $pkg.gitMajor=${v%%.*}"
    flags+=" -X $pkg.gitMinor=$(echo "$v" | cut -d. -f2)"
    flags+=" -X $pkg.gitTreeState=clean"
    [[ -n $date ]] && flags+=" -X $pkg.buildDate=$date"
  done
  echo "$flags"
}

timed_build() {  # NAME OUT CMD...: run CMD (which writes OUT.tmp), then move it into place
  local name=$1 out=$2 start
  shift 2
  if [[ -x $out ]]; then
    log "$name: cached ($out)"
    return
  fi
  mkdir -p "$BIN"
  start=$(date +%s)
  log "$name: building ..."
  "$@"
  mv -f "$out.tmp" "$out"
  log "$name: built in $(($(date +%s) - start))s ($out)"
}

build_kube() {  # OUT PACKAGE
  local out=$1 pkg=$2
  (cd "$HERE/controlplane/kube" && go_env go build -trimpath -ldflags "$(kube_ldflags)" -o "$out.tmp" "$pkg")
}

build_etcd() {
  local out=$1
  (cd "$HERE/controlplane/etcd" && go_env go build -trimpath -ldflags "-s -w" -o "$out.tmp" .)
}

build_helm() {
  local out=$1 gobin
  gobin=$(mktemp -d)
  # `go install pkg@version` ignores any go.mod around it; the version is pinned above.
  GOBIN=$gobin go_env go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$gobin/helm" "$out.tmp"
  rmdir "$gobin"
}

# Prometheus from its Go module (PROMETHEUS_MODULE is the module version of release
# PROMETHEUS_VERSION). Debian's package is built without Kubernetes service discovery, which the
# dashboard test scrapes the sidecars with; only that discovery is compiled in (upstream's
# build tags), which also keeps the build short.
build_prometheus() {
  local out=$1 gobin
  gobin=$(mktemp -d)
  GOBIN=$gobin go_env go install -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE"
  mv "$gobin/prometheus" "$out.tmp"
  rmdir "$gobin"
}

cmd_build() {
  command -v go >/dev/null || die "go is required to build the control plane"
  command -v openssl >/dev/null || die "openssl is required to start the control plane"
  local total lock
  total=$(date +%s)
  # One build at a time per cache: other checkouts and engineers share it.
  mkdir -p "$BIN"
  exec {lock}>"$BIN/.build.lock"
  flock "$lock"
  timed_build kube-apiserver "$(kube_apiserver_bin)" build_kube "$(kube_apiserver_bin)" k8s.io/kubernetes/cmd/kube-apiserver
  timed_build etcd "$(etcd_bin)" build_etcd "$(etcd_bin)"
  local kubectl
  kubectl=$(kubectl_bin)
  if [[ $kubectl == "$BIN/"* ]]; then
    timed_build kubectl "$kubectl" build_kube "$kubectl" k8s.io/kubernetes/cmd/kubectl
  else
    log "kubectl: using $kubectl"
  fi
  timed_build helm "$(helm_bin)" build_helm "$(helm_bin)"
  timed_build prometheus "$(prometheus_bin)" build_prometheus "$(prometheus_bin)"
  log "build: done in $(($(date +%s) - total))s"
}

cmd_paths() {
  echo "export FORKSCOPE_KUBE_APISERVER=$(kube_apiserver_bin)"
  echo "export FORKSCOPE_ETCD=$(etcd_bin)"
  echo "export FORKSCOPE_KUBECTL=$(kubectl_bin)"
  echo "export FORKSCOPE_HELM=$(helm_bin)"
  echo "export FORKSCOPE_PROMETHEUS=$(prometheus_bin)"
}

# A free TCP port on 127.0.0.1, chosen by the kernel. The port is released before the server
# binds it, so a rare race with another process is possible; start retries on that.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

gen_certs() {  # DIR
  local d=$1/pki
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=forkscope-e2e-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    # Serving certificate for the apiserver (and etcd) on 127.0.0.1 / localhost.
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default\nextendedKeyUsage=serverAuth,clientAuth\n' >serving.ext
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout serving.key -out serving.csr 2>/dev/null
    openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile serving.ext -out serving.crt 2>/dev/null
    # Client certificate of the tests' admin user: O=system:masters is bound to cluster-admin.
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=forkscope-e2e-admin" \
      -keyout admin.key -out admin.csr 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile client.ext -out admin.crt 2>/dev/null
    # Service-account token signing key pair.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext ./*.srl
  )
}

write_kubeconfig() {  # DIR URL
  local dir=$1 url=$2 b64
  b64() { base64 -w0 <"$1"; }
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: forkscope-e2e
  cluster:
    server: $url
    certificate-authority-data: $(b64 "$dir/pki/ca.crt")
users:
- name: forkscope-e2e-admin
  user:
    client-certificate-data: $(b64 "$dir/pki/admin.crt")
    client-key-data: $(b64 "$dir/pki/admin.key")
contexts:
- name: forkscope-e2e
  context:
    cluster: forkscope-e2e
    user: forkscope-e2e-admin
    namespace: default
current-context: forkscope-e2e
EOF
  chmod 600 "$dir/kubeconfig"
}

# Start etcd with TLS and client-certificate authentication; wait until it is healthy.
start_etcd() {  # DIR
  local dir=$1 client peer
  client=$(free_port)
  peer=$(free_port)
  mkdir -p "$dir/etcd-data"
  "$(etcd_bin)" --name forkscope-e2e --data-dir "$dir/etcd-data" \
    --listen-client-urls "https://127.0.0.1:$client" --advertise-client-urls "https://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "forkscope-e2e=http://127.0.0.1:$peer" --listen-metrics-urls "" \
    --cert-file "$dir/pki/serving.crt" --key-file "$dir/pki/serving.key" \
    --client-cert-auth --trusted-ca-file "$dir/pki/ca.crt" \
    --unsafe-no-fsync --quota-backend-bytes 1073741824 --log-level warn \
    >"$dir/etcd.log" 2>&1 &
  echo $! >"$dir/etcd.pid"
  echo "https://127.0.0.1:$client" >"$dir/etcd.url"
  wait_until "$dir" etcd "https://127.0.0.1:$client/health" '"health":"true"' 60
}

# Start kube-apiserver against that etcd; wait until /readyz says ok. The flags follow the
# minimum that controller-runtime's envtest uses, with client-certificate authentication and
# RBAC authorization switched on as in a real cluster.
start_apiserver() {  # DIR
  local dir=$1 port
  port=$(free_port)
  "$(kube_apiserver_bin)" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" \
    --etcd-servers "$(cat "$dir/etcd.url")" --etcd-cafile "$dir/pki/ca.crt" \
    --etcd-certfile "$dir/pki/serving.crt" --etcd-keyfile "$dir/pki/serving.key" \
    --tls-cert-file "$dir/pki/serving.crt" --tls-private-key-file "$dir/pki/serving.key" \
    --client-ca-file "$dir/pki/ca.crt" --authorization-mode RBAC --anonymous-auth=false \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$dir/pki/sa.pub" \
    --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
    --disable-admission-plugins ServiceAccount --endpoint-reconciler-type none \
    --cert-dir "$dir/pki" --profiling=false --v 1 \
    >"$dir/kube-apiserver.log" 2>&1 &
  echo $! >"$dir/kube-apiserver.pid"
  echo "https://127.0.0.1:$port" >"$dir/kube-apiserver.url"
  wait_until "$dir" kube-apiserver "https://127.0.0.1:$port/readyz" '^ok$' 120
}

# Poll URL with the admin client certificate until the body matches PATTERN, the process
# dies, or TIMEOUT_S passes. Never a fixed sleep.
wait_until() {  # DIR NAME URL PATTERN TIMEOUT_S
  local dir=$1 name=$2 url=$3 pattern=$4 timeout=$5 pid deadline
  pid=$(cat "$dir/$name.pid")
  deadline=$(($(date +%s) + timeout))
  while :; do
    if curl -sf --max-time 2 --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" \
      --key "$dir/pki/admin.key" "$url" 2>/dev/null | grep -qE "$pattern"; then
      return 0
    fi
    if ! alive "$pid"; then
      log "$name exited before it was ready; last lines of $dir/$name.log:"
      tail -n 20 "$dir/$name.log" >&2
      return 1
    fi
    if (($(date +%s) >= deadline)); then
      log "$name not ready after ${timeout}s; last lines of $dir/$name.log:"
      tail -n 20 "$dir/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
}

# Whether PID runs (a zombie, i.e. exited but not yet reaped, does not count).
alive() {  # PID
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

cmd_start() {  # DIR
  local dir=${1:?usage: start DIR}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [[ -x $(kube_apiserver_bin) && -x $(etcd_bin) ]] || die "binaries missing: run '$0 build' first"
  local started attempt
  started=$(date +%s%N)
  gen_certs "$dir"
  # A free port can be taken between choosing and binding it: retry with new ports.
  for attempt in 1 2 3; do
    if start_etcd "$dir" && start_apiserver "$dir"; then
      break
    fi
    stop_processes "$dir"
    ((attempt < 3)) || die "control plane did not start (logs in $dir)"
    log "start attempt $attempt failed; retrying with new ports"
  done
  write_kubeconfig "$dir" "$(cat "$dir/kube-apiserver.url")"
  {
    echo "export KUBECONFIG=$dir/kubeconfig"
    echo "export FORKSCOPE_E2E_KUBECONFIG=$dir/kubeconfig"
    echo "export FORKSCOPE_E2E_DIR=$dir"
    cmd_paths
  } >"$dir/env"
  log "ready in $((($(date +%s%N) - started) / 1000000))ms: $(cat "$dir/kube-apiserver.url") (source $dir/env)"
}

# Stop the processes recorded in DIR/*.pid: TERM, wait up to 15s, then KILL. A PID is only
# signalled while its command line still names DIR, so a recycled PID is never hit.
stop_processes() {  # DIR
  local dir=$1 name pid deadline
  for name in kube-apiserver etcd; do
    [[ -f $dir/$name.pid ]] || continue
    pid=$(cat "$dir/$name.pid")
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir/"; then
      kill -TERM "$pid" 2>/dev/null || true
      deadline=$(($(date +%s) + 15))
      while alive "$pid" && (($(date +%s) < deadline)); do sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/$name.pid"
  done
}

cmd_stop() {  # DIR
  local dir=${1:?usage: stop DIR}
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd)
  stop_processes "$dir"
  rm -rf "$dir"
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  paths) cmd_paths ;;
  *) die "usage: $0 build | start DIR | stop DIR | paths" ;;
esac
