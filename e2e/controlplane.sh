#!/usr/bin/env bash
# e2e/controlplane.sh: a real single-node Kubernetes cluster for forkscope's end-to-end tests
# (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy,
# containerd + runc + a CNI bridge), plus the client tools the tests drive (kubectl, helm,
# prometheus). e2e/README.md says what runs and how to use it by hand.
#
#   e2e/controlplane.sh build           build or install every binary once, cached by version
#   e2e/controlplane.sh start DIR       start the cluster with its state in DIR; writes
#                                       DIR/kubeconfig and DIR/env; returns once the Node is
#                                       Ready, pods can be created and the `kubernetes` Service
#                                       answers. Needs root (one node per machine at a time).
#   e2e/controlplane.sh stop DIR        delete the workloads, stop exactly the processes `start
#                                       DIR` started, undo its host changes, remove DIR
#   e2e/controlplane.sh import DIR TAR...  import OCI archives NAME_TAG.tar into the node's
#                                       containerd as docker.io/local/NAME:TAG
#   e2e/controlplane.sh paths           print the cached binaries' paths (sh `export` lines)
#
# Binaries live in ${FORKSCOPE_CACHE:-$HOME/.cache/forkscope}/bin/NAME-VERSION. The Go builds
# use the Go module proxy as configured on the machine (GOPROXY) with GOFLAGS=-mod=mod;
# containerd, runc, the CNI plugins, buildah and mmdebstrap come from Debian's packages.
set -euo pipefail

KUBE_VERSION=v1.33.13  # keep in step with e2e/controlplane/kube/go.mod
ETCD_VERSION=v3.5.21   # keep in step with e2e/controlplane/etcd/go.mod
HELM_VERSION=v3.22.0
PROMETHEUS_VERSION=v3.16.0
PROMETHEUS_MODULE=v0.316.0  # the Go module version of that release (github.com/prometheus/prometheus)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${FORKSCOPE_CACHE:-$HOME/.cache/forkscope}
BIN=$CACHE/bin
# OCI archives NAME_TAG.tar that `start` imports into the node (scripts/images writes there).
IMAGES=${FORKSCOPE_E2E_IMAGES:-$CACHE/images}

# The node's network. Every address the cluster uses is on 127.0.0.1 or on this bridge: the
# kubelet refuses a loopback node IP, so the node IP is the bridge's own (the pods' gateway).
NODE_NAME=forkscope-e2e
BRIDGE=forkscope0
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.0.0.0/24
SERVICE_IP=10.0.0.1   # the `kubernetes` Service: the first address of SERVICE_CIDR
PULL_PROXY=http://127.0.0.1:9   # the discard port: nothing listens, so every pull is refused
# One node per machine: the bridge, the kubelet's port and cgroups, and kube-proxy's iptables
# chains are machine-wide. `start` waits for this lock; etcd holds it until `stop`.
NODE_LOCK=${FORKSCOPE_E2E_NODE_LOCK:-/run/forkscope-e2e-node.lock}
# Host settings the kubelet (vm.*, kernel.*), the CNI bridge (ip_forward) or kube-proxy (told to
# leave them alone, saved anyway) may change; `stop` puts back what `start` found.
SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward
  net.netfilter.nf_conntrack_max net.netfilter.nf_conntrack_tcp_timeout_established
  net.netfilter.nf_conntrack_tcp_timeout_close_wait net.ipv4.conf.all.route_localnet"
# Started by `start DIR` (DIR/NAME.pid), stopped by `stop DIR` in this order.
PROCESSES="kube-controller-manager kube-scheduler kube-proxy kubelet containerd kube-apiserver etcd"
# Debian packages the node needs: command (or file) -> package.
NODE_PACKAGES="containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins
  buildah:buildah mmdebstrap:mmdebstrap iptables:iptables nft:nftables ip:iproute2 gcc:gcc
  /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev curl:curl openssl:openssl unshare:util-linux"

log() { printf 'controlplane: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

kube_bin() { echo "$BIN/$1-$KUBE_VERSION"; }   # NAME: kube-apiserver, kubelet, ...
kube_apiserver_bin() { kube_bin kube-apiserver; }
etcd_bin() { echo "$BIN/etcd-$ETCD_VERSION"; }
helm_bin() { echo "$BIN/helm-$HELM_VERSION"; }
prometheus_bin() { echo "$BIN/prometheus-$PROMETHEUS_VERSION"; }
promtool_bin() { echo "$BIN/promtool-$PROMETHEUS_VERSION"; }
pause_image() { echo "$BIN/pause_e2e.tar"; }

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
    kube_bin kubectl
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
  if [[ -e $out ]]; then
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
# promtool (the sidecar's tests lint its /metrics with `promtool check metrics`) comes from the
# same module, so the second build reuses the first one's packages.
build_prometheus() {  # OUT [COMMAND]
  local out=$1 cmd=${2:-prometheus} gobin
  gobin=$(mktemp -d)
  GOBIN=$gobin go_env go install -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=${PROMETHEUS_VERSION#v}" \
    "github.com/prometheus/prometheus/cmd/$cmd@$PROMETHEUS_MODULE"
  mv "$gobin/$cmd" "$out.tmp"
  rmdir "$gobin"
}

# The pod sandbox image: a static pause binary in an otherwise empty image, as an OCI archive.
build_pause() {  # OUT
  local out=$1 work c
  work=$(mktemp -d)
  gcc -Os -static -o "$work/pause" "$HERE/node/pause.c"
  strip "$work/pause"
  local buildah=(buildah --root "$CACHE/buildah/storage" --runroot "$CACHE/buildah/run" --storage-driver vfs)
  c=$("${buildah[@]}" from scratch)
  "${buildah[@]}" copy -q "$c" "$work/pause" /pause >/dev/null
  "${buildah[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  "${buildah[@]}" commit -q --rm "$c" localhost/forkscope-e2e-pause >/dev/null
  rm -f "$out.tmp"
  "${buildah[@]}" push -q localhost/forkscope-e2e-pause "oci-archive:$out.tmp:docker.io/local/pause:e2e"
  "${buildah[@]}" rmi localhost/forkscope-e2e-pause >/dev/null
  rm -rf "$work"
}

# apt_install PACKAGE...: Debian's packages, without starting any service they ship (the tests
# run their own containerd).
apt_install() {
  local start policy=/usr/sbin/policy-rc.d ours= rc=0
  start=$(date +%s)
  log "installing Debian packages: $* ..."
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && ours=1
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } || rc=$?
  [[ -n $ours ]] && rm -f "$policy"
  ((rc == 0)) || die "apt-get install $* failed ($rc)"
  log "installed in $(($(date +%s) - start))s: $*"
}

install_packages() {
  local missing=() pair what
  for pair in $NODE_PACKAGES; do
    what=${pair%%:*}
    if [[ $what == /* ]]; then [[ -e $what ]] && continue; else command -v "$what" >/dev/null && continue; fi
    missing+=("${pair#*:}")
  done
  ((${#missing[@]} == 0)) && { log "Debian packages: present"; return; }
  apt_install "${missing[@]}"
}

cmd_build() {
  command -v go >/dev/null || die "go is required to build the control plane"
  local total lock name
  total=$(date +%s)
  # One build at a time per cache: other checkouts and engineers share it.
  mkdir -p "$BIN"
  exec {lock}>"$BIN/.build.lock"
  flock "$lock"
  install_packages
  timed_build kube-apiserver "$(kube_apiserver_bin)" build_kube "$(kube_apiserver_bin)" k8s.io/kubernetes/cmd/kube-apiserver
  timed_build etcd "$(etcd_bin)" build_etcd "$(etcd_bin)"
  for name in kubelet kube-scheduler kube-controller-manager kube-proxy; do
    timed_build "$name" "$(kube_bin "$name")" build_kube "$(kube_bin "$name")" "k8s.io/kubernetes/cmd/$name"
  done
  local kubectl
  kubectl=$(kubectl_bin)
  if [[ $kubectl == "$BIN/"* ]]; then
    timed_build kubectl "$kubectl" build_kube "$kubectl" k8s.io/kubernetes/cmd/kubectl
  else
    log "kubectl: using $kubectl"
  fi
  timed_build helm "$(helm_bin)" build_helm "$(helm_bin)"
  timed_build prometheus "$(prometheus_bin)" build_prometheus "$(prometheus_bin)"
  timed_build promtool "$(promtool_bin)" build_prometheus "$(promtool_bin)" promtool
  timed_build pause-image "$(pause_image)" build_pause "$(pause_image)"
  log "build: done in $(($(date +%s) - total))s"
}

cmd_paths() {
  echo "export FORKSCOPE_KUBE_APISERVER=$(kube_apiserver_bin)"
  echo "export FORKSCOPE_ETCD=$(etcd_bin)"
  echo "export FORKSCOPE_KUBECTL=$(kubectl_bin)"
  echo "export FORKSCOPE_HELM=$(helm_bin)"
  echo "export FORKSCOPE_PROMETHEUS=$(prometheus_bin)"
  echo "export FORKSCOPE_PROMTOOL=$(promtool_bin)"
}

# A free TCP port on 127.0.0.1, chosen by the kernel. The port is released before the server
# binds it, so a rare race with another process is possible; start retries on that.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# ------------------------------------------------------------------------------ certificates

# cert NAME SUBJECT EXTENSIONS: NAME.key + NAME.crt signed by the cluster CA (in the cwd).
cert() {
  local name=$1 subject=$2 extensions=$3
  openssl req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf '%s\n' "$extensions" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

gen_certs() {  # DIR
  local d=$1/pki
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=forkscope-e2e-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    local client='extendedKeyUsage=clientAuth'
    # The apiserver (and etcd, which shares it) is reached at 127.0.0.1, at the node's bridge
    # address, and from pods through the `kubernetes` Service, by IP or by name.
    cert serving "/CN=kube-apiserver" "subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
extendedKeyUsage=serverAuth,clientAuth"
    # The tests' admin user: O=system:masters is bound to cluster-admin.
    cert admin "/O=system:masters/CN=forkscope-e2e-admin" "$client"
    # Each component under its own identity, authorized by the default RBAC bindings (the
    # kubelet by the Node authorizer).
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
    cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$client"
    cert kubelet-serving "/CN=$NODE_NAME" "subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME
extendedKeyUsage=serverAuth"
    cert controller-manager "/CN=system:kube-controller-manager" "$client"
    cert scheduler "/CN=system:kube-scheduler" "$client"
    cert kube-proxy "/CN=system:kube-proxy" "$client"
    # Service-account token signing key pair.
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ca.srl
  )
}

write_kubeconfig() {  # DIR NAME URL USER: DIR/NAME with the client certificate pki/USER.*
  local dir=$1 name=$2 url=$3 user=$4 b64
  b64() { base64 -w0 <"$1"; }
  cat >"$dir/$name" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: forkscope-e2e
  cluster:
    server: $url
    certificate-authority-data: $(b64 "$dir/pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$dir/pki/$user.crt")
    client-key-data: $(b64 "$dir/pki/$user.key")
contexts:
- name: forkscope-e2e
  context:
    cluster: forkscope-e2e
    user: $user
    namespace: default
current-context: forkscope-e2e
EOF
  chmod 600 "$dir/$name"
}

# ------------------------------------------------------------------------------ processes

# spawn DIR NAME CMD...: run CMD in the background, output in DIR/NAME.log, PID in DIR/NAME.pid.
# The node lock's descriptor is closed for it unless NAME is etcd (which holds the lock).
spawn() {
  local dir=$1 name=$2
  shift 2
  if [[ $name == etcd ]]; then
    "$@" >"$dir/$name.log" 2>&1 &
  else
    "$@" >"$dir/$name.log" 2>&1 {NODE_LOCK_FD}>&- &
  fi
  echo $! >"$dir/$name.pid"
}

# Whether PID runs (a zombie, i.e. exited but not yet reaped, does not count).
alive() {  # PID
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

# wait_for DIR NAME TIMEOUT_S CMD...: poll CMD until it succeeds; fail (with the end of NAME's
# log) when NAME's process exits or TIMEOUT_S passes. Never a fixed sleep.
wait_for() {
  local dir=$1 name=$2 timeout=$3 deadline
  shift 3
  deadline=$(($(date +%s) + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! alive "$(cat "$dir/$name.pid")"; then
      log "$name exited before it was ready; last lines of $dir/$name.log:"
      tail -n 20 "$dir/$name.log" >&2
      return 1
    fi
    if (($(date +%s) >= deadline)); then
      log "$name: not ready after ${timeout}s; last lines of $dir/$name.log:"
      tail -n 20 "$dir/$name.log" >&2
      return 1
    fi
    sleep 0.1
  done
}

# https_ok DIR URL PATTERN: the body of URL, fetched with the admin certificate, matches.
https_ok() {
  curl -sf --max-time 2 --cacert "$1/pki/ca.crt" --cert "$1/pki/admin.crt" --key "$1/pki/admin.key" "$2" |
    grep -qE "$3"
}

start_etcd() {  # DIR
  local dir=$1 client peer
  client=$(free_port)
  peer=$(free_port)
  mkdir -p "$dir/etcd-data"
  spawn "$dir" etcd "$(etcd_bin)" --name forkscope-e2e --data-dir "$dir/etcd-data" \
    --listen-client-urls "https://127.0.0.1:$client" --advertise-client-urls "https://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "forkscope-e2e=http://127.0.0.1:$peer" --listen-metrics-urls "" \
    --cert-file "$dir/pki/serving.crt" --key-file "$dir/pki/serving.key" \
    --client-cert-auth --trusted-ca-file "$dir/pki/ca.crt" \
    --unsafe-no-fsync --quota-backend-bytes 1073741824 --log-level warn
  echo "https://127.0.0.1:$client" >"$dir/etcd.url"
  wait_for "$dir" etcd 60 https_ok "$dir" "https://127.0.0.1:$client/health" '"health":"true"'
}

# kube-apiserver: Node + RBAC authorization, NodeRestriction and ServiceAccount admission, and a
# client certificate for the kubelet API (logs, exec, port-forward). It listens on the bridge
# address only and advertises it, so the lease endpoint reconciler points the `kubernetes`
# Service (SERVICE_IP:443) at NODE_IP:port, which pods reach through kube-proxy.
start_apiserver() {  # DIR
  local dir=$1 port
  port=$(free_port)
  spawn "$dir" kube-apiserver "$(kube_apiserver_bin)" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$port" \
    --etcd-servers "$(cat "$dir/etcd.url")" --etcd-cafile "$dir/pki/ca.crt" \
    --etcd-certfile "$dir/pki/serving.crt" --etcd-keyfile "$dir/pki/serving.key" \
    --tls-cert-file "$dir/pki/serving.crt" --tls-private-key-file "$dir/pki/serving.key" \
    --client-ca-file "$dir/pki/ca.crt" --authorization-mode Node,RBAC --anonymous-auth=false \
    --enable-admission-plugins NodeRestriction \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$dir/pki/sa.pub" \
    --service-account-signing-key-file "$dir/pki/sa.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true \
    --endpoint-reconciler-type lease \
    --kubelet-client-certificate "$dir/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$dir/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$dir/pki/ca.crt" \
    --kubelet-preferred-address-types InternalIP \
    --cert-dir "$dir/pki" --profiling=false --v 1
  echo "https://$NODE_IP:$port" >"$dir/kube-apiserver.url"
  wait_for "$dir" kube-apiserver 120 https_ok "$dir" "https://$NODE_IP:$port/readyz" '^ok$'
}

# render TEMPLATE OUT: the template with @DIR@, @NODE_IP@, ... replaced.
render() {
  local dir=$1 template=$2 out=$3
  shift 3
  sed -e "s#@DIR@#$dir#g" -e "s#@NODE_IP@#$NODE_IP#g" -e "s#@POD_CIDR@#$POD_CIDR#g" \
    -e "s#@SERVICE_CIDR@#$SERVICE_CIDR#g" -e "s#@BRIDGE@#$BRIDGE#g" \
    -e "s#@RUNC@#$(command -v runc)#g" -e "s#@CNI_BIN@#/usr/lib/cni#g" "$@" \
    "$HERE/node/$template" >"$out"
}

ctr_node() {  # DIR ARGS...: ctr against the node's containerd, in the CRI namespace
  local dir=$1
  shift
  ctr --address "$dir/containerd/containerd.sock" --namespace k8s.io "$@"
}

# import_images DIR TAR...: each NAME_TAG.tar (an OCI archive) as docker.io/local/NAME:TAG.
import_images() {
  local dir=$1 tar base name out
  shift
  for tar in "$@"; do
    base=$(basename "$tar" .tar)
    [[ $base == *_* ]] || die "$tar: expected NAME_TAG.tar"
    name=docker.io/local/${base%_*}
    if ! out=$(ctr_node "$dir" images import --base-name "$name" --index-name "$name:${base##*_}" "$tar" 2>&1); then
      log "import of $name:${base##*_} failed: $out"
      return 1
    fi
    log "imported $name:${base##*_}"
  done
}

start_containerd() {  # DIR
  local dir=$1
  mkdir -p "$dir/containerd" "$dir/cni/net.d" "$dir/cni/ipam"
  render "$dir" containerd.toml.in "$dir/containerd/config.toml"
  render "$dir" cni.conflist.in "$dir/cni/net.d/10-forkscope-e2e.conflist"
  # Nothing is ever pulled: the images are local, and a manifest naming any other image (a
  # chart's default, a typo) must fail on this machine rather than reach a registry. Every
  # registry request goes to a proxy on a closed loopback port (PULL_PROXY) and is refused
  # there, before any name is resolved.
  # containerd 1.6 now and then refuses an import while unpacking ("content digest ... not
  # found", a digest of the import in flight, in no archive); importing again into the same
  # containerd keeps failing, a containerd started afresh does not. So: up to three starts.
  local attempt
  for attempt in 1 2 3; do
    spawn "$dir" containerd env HTTP_PROXY="$PULL_PROXY" HTTPS_PROXY="$PULL_PROXY" \
      http_proxy="$PULL_PROXY" https_proxy="$PULL_PROXY" NO_PROXY= no_proxy= \
      containerd --config "$dir/containerd/config.toml"
    wait_for "$dir" containerd 30 ctr_node "$dir" version
    import_links "$dir" && return 0
    ((attempt < 3)) || die "containerd refused the images three times (log: $dir/containerd.log)"
    log "starting containerd afresh (attempt $((attempt + 1)))"
    stop_processes_named "$dir" containerd
    rm -rf "$dir/containerd/root" "$dir/containerd/state" || true
  done
}

# import_links DIR: imports the pause image and every archive of $IMAGES, from hard links.
import_links() {  # DIR
  local dir=$1
  # Import from links taken now: scripts/images (another checkout's, say) may replace an
  # archive while ctr reads it, and ctr opens it more than once. A link keeps this version.
  local images=() tar
  mkdir -p "$dir/images"
  for tar in "$(pause_image)" "$IMAGES"/*_*.tar; do
    [[ -e $tar ]] || continue
    ln -f "$tar" "$dir/images/" 2>/dev/null || cp "$tar" "$dir/images/"
    images+=("$dir/images/$(basename "$tar")")
  done
  local rc=0
  import_images "$dir" "${images[@]}" || rc=$?
  rm -rf "$dir/images"
  return "$rc"
}

start_kubelet() {  # DIR
  local dir=$1 port
  port=$(free_port)
  mkdir -p "$dir/kubelet" "$dir/pod-logs"
  render "$dir" kubelet.yaml.in "$dir/kubelet/config.yaml" -e "s#@HEALTHZ_PORT@#$port#g"
  spawn "$dir" kubelet "$(kube_bin kubelet)" --config "$dir/kubelet/config.yaml" \
    --kubeconfig "$dir/kubelet.kubeconfig" --root-dir "$dir/kubelet" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
  wait_for "$dir" kubelet 60 curl -sf --max-time 2 "http://127.0.0.1:$port/healthz"
}

# kube-proxy in iptables mode, told to change no sysctl: no conntrack tuning (0 = leave as is),
# NodePorts on the node IP only (so no route_localnet), OOM score left alone (it cannot lower
# it here). Health and metrics listen on 127.0.0.1.
start_kube_proxy() {  # DIR
  local dir=$1 health metrics
  health=$(free_port)
  metrics=$(free_port)
  spawn "$dir" kube-proxy "$(kube_bin kube-proxy)" --kubeconfig "$dir/kube-proxy.kubeconfig" \
    --hostname-override "$NODE_NAME" --bind-address "$NODE_IP" --proxy-mode iptables \
    --cluster-cidr "$POD_CIDR" --nodeport-addresses primary \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 \
    --conntrack-tcp-timeout-close-wait 0 --oom-score-adj 0 \
    --healthz-bind-address "127.0.0.1:$health" --metrics-bind-address "127.0.0.1:$metrics" --v 1
}

start_scheduler_and_controllers() {  # DIR
  local dir=$1 scheduler controllers
  scheduler=$(free_port)
  controllers=$(free_port)
  spawn "$dir" kube-scheduler "$(kube_bin kube-scheduler)" --kubeconfig "$dir/scheduler.kubeconfig" \
    --authentication-kubeconfig "$dir/scheduler.kubeconfig" \
    --authorization-kubeconfig "$dir/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$scheduler" --leader-elect=false --v 1
  # --use-service-account-credentials: each controller acts as its own ServiceAccount.
  spawn "$dir" kube-controller-manager "$(kube_bin kube-controller-manager)" \
    --kubeconfig "$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$controllers" --leader-elect=false \
    --use-service-account-credentials --service-account-private-key-file "$dir/pki/sa.key" \
    --root-ca-file "$dir/pki/ca.crt" --cluster-signing-cert-file "$dir/pki/ca.crt" \
    --cluster-signing-key-file "$dir/pki/ca.key" --controllers '*' --v 1
  wait_for "$dir" kube-scheduler 60 curl -skf --max-time 2 "https://127.0.0.1:$scheduler/healthz"
  wait_for "$dir" kube-controller-manager 60 curl -skf --max-time 2 "https://127.0.0.1:$controllers/healthz"
}

# --------------------------------------------------------------------------- host changes

# What `start` is about to change on the host, so that `stop` can put it back.
save_host_state() {  # DIR
  local dir=$1 key ipt table
  for key in $SYSCTLS; do
    printf '%s=%s\n' "$key" "$(sysctl -n "$key" 2>/dev/null)"
  done >"$dir/host/sysctls"
  for ipt in iptables ip6tables; do
    for table in filter nat mangle; do
      "$ipt" -t "$table" -S 2>/dev/null | awk -v i="$ipt" -v t="$table" '/^-N /{print i, t, $2}'
    done
  done >"$dir/host/chains"
  nft list tables 2>/dev/null >"$dir/host/nft-tables" || true
  ls /sys/fs/cgroup/*/kubepods -d 2>/dev/null >"$dir/host/cgroups" || true
  ls /var/run/netns 2>/dev/null >"$dir/host/netns" || true
}

# KUBE-* chains that were not there before `start` (the kubelet's canaries and firewall,
# kube-proxy's services), in both families: unlink, flush, then delete them.
remove_new_chains() {  # DIR
  local dir=$1 ipt table chain rule
  for ipt in iptables ip6tables; do
    for table in filter nat mangle; do
      local new=()
      for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/{print $2}'); do
        grep -qx "$ipt $table $chain" "$dir/host/chains" || new+=("$chain")
      done
      ((${#new[@]})) || continue
      for chain in "${new[@]}"; do
        { "$ipt" -t "$table" -S | grep -E -- "-j $chain( |\$)" || true; } | sed 's/^-A /-D /' |
          while read -r rule; do eval "$ipt" -t "$table" "$rule" || true; done
      done
      for chain in "${new[@]}"; do "$ipt" -t "$table" -F "$chain" || true; done
      for chain in "${new[@]}"; do "$ipt" -t "$table" -X "$chain" || true; done
    done
  done
  # iptables (the nf_tables flavour) also creates the tables themselves: remove those that were
  # not there before and are empty now (only base chains, no rule).
  local line family name
  nft list tables 2>/dev/null | while read -r line; do
    grep -qxF "$line" "$dir/host/nft-tables" && continue
    read -r _ family name <<<"$line"
    nft list table "$family" "$name" | awk '/^\t\t/ && !/^\t\ttype /{rules++} END {exit rules > 0}' &&
      { nft delete table "$family" "$name" || true; }
  done
}

restore_host_state() {  # DIR
  local dir=$1 line m netns cgroup
  [[ -d $dir/host ]] || return 0
  # Mounts below DIR (pod volumes, shm, container root file systems), deepest first.
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  # The pods' network namespaces (the kubelet deletes them with the pods; this catches leftovers).
  for netns in $(ls /var/run/netns 2>/dev/null); do
    [[ $netns == cni-* ]] && ! grep -qx "$netns" "$dir/host/netns" && { ip netns delete "$netns" || true; }
  done
  ip link delete "$BRIDGE" 2>/dev/null || true
  # The kubelet's cgroup trees, leaves first (only those it created).
  for cgroup in /sys/fs/cgroup/*/kubepods; do
    [[ -d $cgroup ]] && ! grep -qx "$cgroup" "$dir/host/cgroups" || continue
    find "$cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ -d $cgroup ]] && log "warning: $cgroup still has processes"
  done
  if [[ -f $dir/kube-proxy.log ]]; then
    # Exits 1 here (its IPVS part wants the ipset tool); its iptables and nftables parts run.
    "$(kube_bin kube-proxy)" --cleanup >"$dir/kube-proxy-cleanup.log" 2>&1 || true
  fi
  remove_new_chains "$dir"
  while IFS= read -r line; do
    [[ -n ${line#*=} ]] && { sysctl -qw "$line" || true; }
  done <"$dir/host/sysctls"
}

# ------------------------------------------------------------------------------ start, stop

# The cluster is usable: the Node is Ready and untainted (pods schedule), the `default`
# ServiceAccount exists (ServiceAccount admission accepts pods), and the `kubernetes` Service
# answers through kube-proxy.
node_ready() {  # DIR
  local dir=$1 kubectl
  kubectl=$(kubectl_bin)
  [[ $("$kubectl" --kubeconfig "$dir/kubeconfig" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.spec.taints}') == True/ ]] &&
    "$kubectl" --kubeconfig "$dir/kubeconfig" get serviceaccount default >/dev/null &&
    https_ok "$dir" "https://$SERVICE_IP:443/readyz" '^ok$'
}

cmd_start() {  # DIR
  local dir=${1:?usage: start DIR}
  [[ $(id -u) == 0 ]] || die "start needs root (containerd, the kubelet, the pod network)"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [[ -e $dir/etcd.pid ]] && die "$dir holds a running cluster: '$0 stop $dir' first"
  local name
  for name in etcd kube-apiserver kubelet kube-scheduler kube-controller-manager kube-proxy; do
    [[ -x $(kube_bin "$name") || $name == etcd ]] || die "binaries missing: run '$0 build' first"
  done
  [[ -x $(etcd_bin) && -f $(pause_image) ]] || die "binaries missing: run '$0 build' first"
  local started t
  started=$(date +%s%N)
  exec {NODE_LOCK_FD}>"$NODE_LOCK"
  if ! flock -n "$NODE_LOCK_FD"; then
    log "another e2e node runs on this machine; waiting for it to stop ..."
    flock -w "${FORKSCOPE_E2E_NODE_WAIT:-3600}" "$NODE_LOCK_FD" || die "the node lock $NODE_LOCK stayed busy"
  fi
  # Holding the lock, a bridge left over is a crashed run's.
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "warning: removing $BRIDGE left over by an earlier run"
    # The run that left it may be deleting it right now: gone is as good as deleted.
    ip link delete "$BRIDGE" 2>/dev/null || ! ip link show "$BRIDGE" >/dev/null 2>&1 ||
      die "cannot delete the bridge $BRIDGE left over by an earlier run"
  fi
  mkdir -p "$dir/host"
  save_host_state "$dir"
  gen_certs "$dir"
  # The pod bridge first: the apiserver and kubelet listen on its address. The CNI bridge
  # plugin adopts it. The Service range is routed onto it, so that the host reaches ClusterIPs
  # from NODE_IP without any default route.
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  ip route add "$SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP"
  # A free port can be taken between choosing and binding it: retry with new ports.
  local attempt
  for attempt in 1 2 3; do
    t=$(date +%s%N)
    if start_etcd "$dir" && start_apiserver "$dir"; then
      break
    fi
    stop_processes "$dir"
    ((attempt < 3)) || die "control plane did not start (logs in $dir)"
    log "start attempt $attempt failed; retrying with new ports"
  done
  log "etcd + kube-apiserver ready in $(ms_since "$t")ms"
  local url
  url=$(cat "$dir/kube-apiserver.url")
  write_kubeconfig "$dir" kubeconfig "$url" admin
  for name in kubelet controller-manager scheduler kube-proxy; do
    write_kubeconfig "$dir" "$name.kubeconfig" "$url" "$name"
  done
  t=$(date +%s%N)
  start_containerd "$dir"
  log "containerd ready, images imported in $(ms_since "$t")ms"
  t=$(date +%s%N)
  start_kubelet "$dir"
  start_kube_proxy "$dir"
  start_scheduler_and_controllers "$dir"
  log "kubelet, kube-proxy, kube-scheduler, kube-controller-manager up in $(ms_since "$t")ms"
  wait_for "$dir" kubelet 120 node_ready "$dir"
  {
    echo "export KUBECONFIG=$dir/kubeconfig"
    echo "export FORKSCOPE_E2E_KUBECONFIG=$dir/kubeconfig"
    echo "export FORKSCOPE_E2E_DIR=$dir"
    echo "export FORKSCOPE_E2E_NODE=$NODE_NAME"
    echo "export FORKSCOPE_E2E_CONTAINERD=$dir/containerd/containerd.sock"
    cmd_paths
  } >"$dir/env"
  log "node $NODE_NAME ready in $(ms_since "$started")ms: $url (source $dir/env)"
}

# Stop the processes recorded in DIR/*.pid: TERM, wait up to 15s, then KILL. A PID is only
# signalled while its command line still names DIR, so a recycled PID is never hit.
stop_processes() {  # DIR
  local dir=$1 name pid deadline
  for name in $PROCESSES; do
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

# The workloads: deleted through the API while the kubelet runs, so it tears the pods down
# (containers, network, volumes) itself; whatever it left is killed through containerd; then the
# shims of our containerd (they name its socket) go.
stop_workloads() {  # DIR
  local dir=$1 pid id
  if [[ -f $dir/kubelet.pid ]] && alive "$(cat "$dir/kubelet.pid")"; then
    "$(kubectl_bin)" --kubeconfig "$dir/kubeconfig" delete \
      deployments,replicasets,statefulsets,daemonsets,jobs,pods --all --all-namespaces \
      --grace-period 1 --timeout 60s >/dev/null 2>&1 || log "warning: not every workload was deleted in 60s"
  fi
  stop_processes_named "$dir" kube-controller-manager kube-scheduler kube-proxy kubelet
  if [[ -f $dir/containerd.pid ]] && alive "$(cat "$dir/containerd.pid")"; then
    for id in $(ctr_node "$dir" tasks ls -q 2>/dev/null); do
      ctr_node "$dir" tasks kill --signal SIGKILL "$id" 2>/dev/null || true
    done
    for id in $(ctr_node "$dir" tasks ls -q 2>/dev/null); do ctr_node "$dir" tasks delete --force "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_node "$dir" containers ls -q 2>/dev/null); do ctr_node "$dir" containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop_processes_named "$dir" containerd
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $dir/containerd/containerd.sock( |\$)" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
}

stop_processes_named() {  # DIR NAME...
  local dir=$1
  shift
  PROCESSES="$*" stop_processes "$dir"
}

cmd_stop() {  # DIR
  local dir=${1:?usage: stop DIR}
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd)
  local started
  started=$(date +%s%N)
  # Best effort from here on: a step that fails (its error is printed) does not keep the
  # others from running.
  stop_workloads "$dir" || true
  stop_processes "$dir" || true
  restore_host_state "$dir" || log "warning: the host may not be fully restored"
  rm -rf "$dir"
  log "stopped in $(ms_since "$started")ms; host state restored, $dir removed"
}

cmd_import() {  # DIR TAR...
  local dir=${1:?usage: import DIR TAR...}
  shift
  dir=$(cd "$dir" && pwd)
  import_images "$dir" "$@" || die "import failed"
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  import) shift && cmd_import "$@" ;;
  paths) cmd_paths ;;
  *) die "usage: $0 build | start DIR | stop DIR | import DIR TAR... | paths" ;;
esac
