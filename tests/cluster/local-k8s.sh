#!/usr/bin/env bash
# A real single-node Kubernetes (v1.20.2) on this machine for development and the e2e tests:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd and a kubelet,
# built from Debian's own `kubernetes` source package. Nothing is downloaded but Debian
# packages, and nothing listens beyond 127.0.0.1 and a bridge that exists only here.
#
#   tests/cluster/local-k8s.sh build          build the binaries into $K8S_HOME/bin (cached)
#   tests/cluster/local-k8s.sh up             start the cluster (builds first if needed);
#                                             writes $K8S_HOME/kubeconfig
#   tests/cluster/local-k8s.sh down           stop everything `up` started
#   tests/cluster/local-k8s.sh image NAME DIR load a root filesystem folder as image NAME
#   tests/cluster/local-k8s.sh busybox NAME   load a busybox-static image as NAME
#   tests/cluster/local-k8s.sh debian NAME    load a Debian image with Python 3 as NAME
#   tests/cluster/local-k8s.sh has-image NAME exit 0 when the node has image NAME
#   tests/cluster/local-k8s.sh kubeconfig     print the kubeconfig path
#
# Why it looks the way it does (each found by failing first):
# - bookworm's source package `kubernetes` (1.20.5+really1.20.2) carries the whole tree with
#   vendor/; Debian's Go 1.19 builds it in GOPATH mode after `make generated_files`.
# - 1.20 vendors modern-go/reflect2 1.0.1, which crashes the apiserver on custom resources
#   when built with Go >= 1.18; Debian's golang-github-modern-go-reflect2-dev (1.0.2) replaces it.
# - the version must be stamped with -X, or /version reports v0.0.0 and version checks fail.
# - this VM forbids a negative oom_score_adj, so runc is wrapped to clamp it to 0.
# - the kubelet refuses a loopback node IP; it uses the bridge address 10.88.0.1, and the
#   apiserver reaches it there for logs and exec.
# - no image can be pulled: images are imported into containerd, pods use imagePullPolicy Never.
set -euo pipefail
K8S_HOME=${K8S_HOME:-$HOME/.cache/local-k8s}
VERSION=1.20.2
BIN=$K8S_HOME/bin
RUN=$K8S_HOME/run
CTD=$RUN/containerd
NODE_IP=10.88.0.1
KUBECONFIG_FILE=$K8S_HOME/kubeconfig

say() { echo "local-k8s: $*" >&2; }

apt_updated=0
ensure_packages() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]}"
  if ((apt_updated == 0)); then apt-get update -qq >/dev/null; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# wait_until SECONDS WHAT COMMAND...: polls COMMAND every half second
wait_until() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then say "timed out after ${seconds}s waiting for $what"; return 1; fi
    sleep 0.5
  done
}

build() {
  local components=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
  local src=$K8S_HOME/src tree=$K8S_HOME/src/kubernetes-$VERSION
  local built=1
  for c in "${components[@]}" pause; do [[ -x $BIN/$c ]] || built=0; done
  [[ -f $tree/vendor/github.com/modern-go/reflect2/go_above_118.go ]] || built=0
  if ((built)); then return 0; fi
  ensure_packages golang-go rsync make gcc dpkg-dev golang-github-modern-go-reflect2-dev
  mkdir -p "$src" "$BIN"
  if [[ ! -d $tree ]]; then
    if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/; then
      sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
        >/etc/apt/sources.list.d/ml-intern-deb-src.sources
      apt-get update -qq >/dev/null
    fi
    say "fetching Debian's kubernetes source package"
    (cd "$src" && apt-get source --download-only kubernetes >/dev/null 2>&1 && tar xzf kubernetes_*.orig.tar.gz)
  fi
  local reflect2=$tree/vendor/github.com/modern-go/reflect2
  if [[ ! -f $reflect2/go_above_118.go ]]; then
    rm -rf "$reflect2"
    cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$reflect2"
    rm -f "$BIN"/kube-* "$BIN"/kubelet
  fi
  if [[ ! -f $tree/pkg/generated/openapi/zz_generated.openapi.go ]]; then
    say "generating sources (about a minute)"
    (cd "$tree" && make generated_files >"$K8S_HOME/generate.log" 2>&1)
  fi
  local gopath=$K8S_HOME/gopath
  mkdir -p "$gopath/src/k8s.io"
  ln -sfn "$tree" "$gopath/src/k8s.io/kubernetes"
  local ldflags="-s -w"
  for pkg in component-base/version client-go/pkg/version; do
    local v=k8s.io/kubernetes/vendor/k8s.io/$pkg
    ldflags+=" -X $v.gitVersion=v$VERSION -X $v.gitMajor=1 -X $v.gitMinor=20 -X $v.gitTreeState=clean"
  done
  for c in "${components[@]}"; do
    [[ -x $BIN/$c ]] && continue
    say "building $c (minutes on 2 cores)"
    (cd "$gopath/src/k8s.io/kubernetes" &&
      GOPATH=$gopath GO111MODULE=off GOFLAGS= go build -ldflags "$ldflags" -o "$BIN/$c" "./cmd/$c")
  done
  gcc -static -O2 -o "$BIN/pause" "$tree/build/pause/linux/pause.c"
}

# image NAME DIR [ENTRYPOINT...]: a one-layer docker-archive of DIR, imported into containerd
image() {
  local name=$1 dir=$2; shift 2
  local archive; archive=$(mktemp --suffix=.tar)
  python3 - "$name" "$dir" "$archive" "$@" <<'PY'
import hashlib, io, json, sys, tarfile
name, root, out, entrypoint = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w") as t:
    t.add(root, arcname=".")
layer_bytes = layer.getvalue()
config = json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
               "Entrypoint": entrypoint or None, "Cmd": None if entrypoint else ["/bin/sh"]},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]},
}).encode()
config_name = hashlib.sha256(config).hexdigest() + ".json"
manifest = json.dumps([{"Config": config_name, "RepoTags": [name], "Layers": ["layer.tar"]}]).encode()
with tarfile.open(out, "w") as t:
    for member, data in [(config_name, config), ("layer.tar", layer_bytes), ("manifest.json", manifest)]:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
PY
  ctr --address "$CTD/containerd.sock" -n k8s.io images import "$archive" >/dev/null
  rm -f "$archive"
  say "image $name loaded"
}

busybox() {
  ensure_packages busybox-static
  local root; root=$(mktemp -d)
  mkdir -p "$root"/{bin,etc,tmp,root,workspace,proc,sys,dev}
  chmod 1777 "$root/tmp" "$root/workspace"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/workspace:/bin/sh\n' >"$root/etc/passwd"
  printf 'root:x:0:\nsandbox:x:1000:\n' >"$root/etc/group"
  image "$1" "$root"
  rm -rf "$root"
}

# debian NAME: a Debian bookworm root filesystem with Python 3 (debootstrap minbase), cached
# as a tarball in the cluster's cache directory, so later runs only import it
debian() {
  local cache=$K8S_HOME/debian-python-rootfs.tar
  local root; root=$(mktemp -d)
  if [[ ! -f $cache ]]; then
    ensure_packages debootstrap
    say "building a Debian root filesystem with Python (a few minutes)"
    debootstrap --variant=minbase --include=python3,procps bookworm "$root/fs" http://deb.debian.org/debian \
      >"$K8S_HOME/debootstrap.log" 2>&1 || { say "debootstrap failed: see $K8S_HOME/debootstrap.log"; return 1; }
    rm -rf "$root/fs/var/cache/apt/archives/"*.deb "$root/fs/var/lib/apt/lists/"*
    mkdir -p "$root/fs/workspace"
    chmod 1777 "$root/fs/workspace"
    echo 'sandbox:x:1000:1000:sandbox:/workspace:/bin/bash' >>"$root/fs/etc/passwd"
    echo 'sandbox:x:1000:' >>"$root/fs/etc/group"
    tar -C "$root/fs" -cf "$cache.part" . && mv "$cache.part" "$cache"
  else
    mkdir -p "$root/fs"
    tar -C "$root/fs" -xf "$cache"
  fi
  image "$1" "$root/fs"
  rm -rf "$root"
}

# start NAME LOGFILE COMMAND...: runs COMMAND in its own session, remembering its pid
start() {
  local name=$1 logfile=$2; shift 2
  setsid "$@" >"$logfile" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
}

node_ready() {
  kubectl --kubeconfig "$KUBECONFIG_FILE" get node node1 \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True
}

up() {
  if [[ -f $KUBECONFIG_FILE ]] && kubectl --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz >/dev/null 2>&1 && node_ready; then
    say "already up: export KUBECONFIG=$KUBECONFIG_FILE"
    return 0
  fi
  build
  ensure_packages etcd-server containerd runc containernetworking-plugins openssl iproute2 curl
  mkdir -p "$RUN" "$CTD" /etc/cni/net.d "$RUN/kubelet"
  [[ -f $RUN/sa.key ]] || openssl genrsa -out "$RUN/sa.key" 2048 2>/dev/null
  openssl rsa -in "$RUN/sa.key" -pubout -out "$RUN/sa.pub" 2>/dev/null
  [[ -f $RUN/token ]] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RUN/token"
  local token; token=$(cat "$RUN/token")
  echo "$token,admin,admin,system:masters" >"$RUN/tokens.csv"
  cat >"$KUBECONFIG_FILE" <<YAML
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: "$token"}}]
contexts: [{name: local, context: {cluster: local, user: admin, namespace: default}}]
current-context: local
YAML
  chmod 600 "$KUBECONFIG_FILE"
  cat >/etc/cni/net.d/10-ml-intern-local.conflist <<'JSON'
{"cniVersion": "0.4.0", "name": "ml-intern-local", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
JSON
  ip link show cni0 >/dev/null 2>&1 || { ip link add cni0 type bridge; ip addr add $NODE_IP/16 dev cni0; }
  ip link set cni0 up

  start etcd "$RUN/etcd.log" etcd --data-dir "$RUN/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380
  wait_until 30 etcd curl -sf http://127.0.0.1:2379/health
  start kube-apiserver "$RUN/apiserver.log" "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --secure-port=6443 --bind-address=127.0.0.1 --advertise-address=$NODE_IP --cert-dir="$RUN/certs" \
    --token-auth-file="$RUN/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$RUN/sa.pub" \
    --service-account-signing-key-file="$RUN/sa.key" --service-cluster-ip-range=10.96.0.0/24 \
    --insecure-port=0 --kubelet-preferred-address-types=InternalIP --allow-privileged=true
  wait_until 60 kube-apiserver kubectl --kubeconfig "$KUBECONFIG_FILE" get --raw /readyz
  start kube-controller-manager "$RUN/controller-manager.log" "$BIN/kube-controller-manager" \
    --kubeconfig="$KUBECONFIG_FILE" --bind-address=127.0.0.1 --service-account-private-key-file="$RUN/sa.key" \
    --root-ca-file="$RUN/certs/apiserver.crt" --leader-elect=false --controllers='*,-nodeipam'
  start kube-scheduler "$RUN/scheduler.log" "$BIN/kube-scheduler" --kubeconfig="$KUBECONFIG_FILE" \
    --bind-address=127.0.0.1 --leader-elect=false

  cat >"$RUN/runc" <<'SH'
#!/bin/sh
# this VM forbids a negative oom_score_adj: clamp it in the bundle before runc reads it
prev=""
for arg in "$@"; do
  [ "$prev" = "--bundle" ] && sed -i -E 's/"oomScoreAdj":-[0-9]+/"oomScoreAdj":0/' "$arg/config.json"
  prev="$arg"
done
exec /usr/sbin/runc "$@"
SH
  chmod +x "$RUN/runc"
  cat >"$CTD/config.toml" <<TOML
version = 2
root = "$CTD/root"
state = "$CTD/state"
[grpc]
  address = "$CTD/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      BinaryName = "$RUN/runc"
TOML
  start containerd "$RUN/containerd.log" containerd --config "$CTD/config.toml"
  wait_until 30 containerd ctr --address "$CTD/containerd.sock" version
  if ! ctr --address "$CTD/containerd.sock" -n k8s.io images ls -q | grep -q 'pause:3.2'; then
    local pause_root; pause_root=$(mktemp -d)
    mkdir -p "$pause_root/bin" && cp "$BIN/pause" "$pause_root/bin/pause"
    image registry.k8s.io/pause:3.2 "$pause_root" /bin/pause
    rm -rf "$pause_root"
  fi
  cat >"$RUN/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
address: $NODE_IP
readOnlyPort: 0
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
enforceNodeAllocatable: []
evictionHard: {}
YAML
  start kubelet "$RUN/kubelet.log" "$BIN/kubelet" --config="$RUN/kubelet.yaml" --kubeconfig="$KUBECONFIG_FILE" \
    --container-runtime=remote --container-runtime-endpoint="unix://$CTD/containerd.sock" \
    --hostname-override=node1 --node-ip=$NODE_IP --root-dir="$RUN/kubelet"
  wait_until 90 "node1 Ready" node_ready
  wait_until 60 "the default service account" kubectl --kubeconfig "$KUBECONFIG_FILE" -n default get serviceaccount default
  say "up: export KUBECONFIG=$KUBECONFIG_FILE"
}

down() {
  # containers first, while containerd still answers, so their shims exit
  if [[ -S $CTD/containerd.sock ]]; then
    local ctr_cmd=(ctr --address "$CTD/containerd.sock" -n k8s.io)
    for t in $("${ctr_cmd[@]}" tasks ls -q 2>/dev/null); do "${ctr_cmd[@]}" tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    sleep 1
    for t in $("${ctr_cmd[@]}" tasks ls -q 2>/dev/null); do "${ctr_cmd[@]}" tasks delete -f "$t" >/dev/null 2>&1 || true; done
  fi
  for name in kubelet containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do
    local pidfile=$RUN/$name.pid
    [[ -f $pidfile ]] || continue
    local pid; pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$pidfile"
  done
  for m in $(mount | awk -v r="$RUN" '$3 ~ "^"r {print $3}' | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$RUN/etcd" "$RUN/kubelet" "$CTD/state"
  say "down"
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down ;;
  image) shift; image "$@" ;;
  busybox) busybox "${2:?image name}" ;;
  debian) debian "${2:?image name}" ;;
  has-image) ctr --address "$CTD/containerd.sock" -n k8s.io images ls -q 2>/dev/null | grep -qx "${2:?image name}" ;;
  kubeconfig) echo "$KUBECONFIG_FILE" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
