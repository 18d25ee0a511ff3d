#!/usr/bin/env bash
# A real one-node Kubernetes cluster in one container on the local Docker engine, for the
# Kubernetes backend's conformance run (see ../shared/notes/k8s-here.md for why it looks so).
#
#   bash scripts/k8s-cluster.sh up       build (cached by version), start, import images, kubeconfig
#   bash scripts/k8s-cluster.sh down     remove the node container and its volume (always safe)
#   bash scripts/k8s-cluster.sh status   what runs, what is cached
#   bash scripts/k8s-cluster.sh build    only the binaries
#
# Binaries come from Debian's own `kubernetes` source package (1.20), built with Debian's Go;
# etcd and the CNI plugins are Debian's packages, unpacked (nothing is installed on the host).
# The build is cached under $DGW_K8S_CACHE/<version>/, so a second run takes seconds.
#
# The node never changes the host's kernel settings: it runs without --privileged, with
# /proc/sys entries the kubelet would rewrite (global ones) covered by bind-mounted files, no
# kube-proxy (no conntrack sysctls), and no network but its own internal bridge (no way out).
#
# Environment: DGW_K8S_CACHE (default /var/cache/dgw-k8s), DGW_K8S_NAME (node container and
# volume name, default dgw-k8s-node), DGW_K8S_IMAGE (default dind-gateway/dind:latest),
# DGW_K8S_KUBECONFIG (default $DGW_K8S_CACHE/<name>.kubeconfig), DGW_K8S_JOBS (go build -p, 2).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD

cache=${DGW_K8S_CACHE:-/var/cache/dgw-k8s}
name=${DGW_K8S_NAME:-dgw-k8s-node}
image=${DGW_K8S_IMAGE:-dind-gateway/dind:latest}
kubeconfig=${DGW_K8S_KUBECONFIG:-$cache/$name.kubeconfig}
jobs=${DGW_K8S_JOBS:-2}
pause_image=dgw-k8s/pause:1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
t0=$(date +%s.%N)
step_start=$t0
step() { # step NAME: print how long the previous step took, then start the next
  local now
  now=$(date +%s.%N)
  [ -z "${step_name:-}" ] || printf '    %-28s %6.1f s\n' "$step_name" "$(awk "BEGIN { print $now - $step_start }")" >&2
  step_name=$1
  step_start=$now
  [ -z "$1" ] || say "$1"
}

# --------------------------------------------------------------------------- private apt
# apt with its own lists and a deb-src line made from the system's Debian sources: the
# system's sources, lists and installed packages are never touched.
aptdir=$cache/apt
apt_opts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=$aptdir/none"
  -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache=$aptdir/cache"
  -o "Dir::Cache::Archives=$aptdir/archives" -o "APT::Get::AllowUnauthenticated=false" -q)

private_apt() {
  mkdir -p "$aptdir/lists/partial" "$aptdir/cache" "$aptdir/archives/partial" "$aptdir/none"
  {
    # one-line sources
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      grep -E '^deb\s' | grep '/debian' | sed -E 's/^deb\s/deb-src /' || :
    # deb822 sources: Types/URIs/Suites/Components stanzas with a Debian URI
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      awk 'BEGIN { RS = ""; FS = "\n" }
        { u = s = c = "" ; for (i = 1; i <= NF; i++) {
            if ($i ~ /^URIs:/) u = substr($i, 6); if ($i ~ /^Suites:/) s = substr($i, 8)
            if ($i ~ /^Components:/) c = substr($i, 12) }
          if (u ~ /\/debian/) { n = split(s, ss, " "); split(u, uu, " ")
            for (j = 1; j <= n; j++) { print "deb-src " uu[1] " " ss[j] " " c; print "deb " uu[1] " " ss[j] " " c } } }' "$f"
    done
  } | sed -E 's/\s+/ /g' | sort -u >"$aptdir/sources.list"
  grep -q '^deb-src' "$aptdir/sources.list" || { echo "no Debian source in /etc/apt" >&2; exit 1; }
  if [ -z "$(ls "$aptdir/lists" | grep -v partial)" ] || [ -n "${DGW_K8S_REFRESH:-}" ]; then
    apt-get "${apt_opts[@]}" update >/dev/null
  fi
}

# --------------------------------------------------------------------------- build
build() {
  local ver dir src gopath goroot
  mkdir -p "$cache"
  exec 9>"$cache/.lock"
  flock 9 # one build at a time; a second caller waits and then finds it cached
  if [ -f "$cache/version" ] && [ -f "$cache/$(cat "$cache/version")/.done" ] && [ -z "${DGW_K8S_REFRESH:-}" ]; then
    ver=$(cat "$cache/version")
    say "kubernetes $ver: cached in $cache/$ver"
    return 0
  fi
  local need=()
  command -v dpkg-source >/dev/null || need+=(dpkg-dev)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
  command -v make >/dev/null || need+=(make)
  command -v flock >/dev/null || need+=(util-linux)
  if [ ${#need[@]} -gt 0 ]; then
    step "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  step "private apt lists"
  private_apt
  ver=$(apt-cache "${apt_opts[@]}" showsrc kubernetes | awk '/^Version:/ { print $2 }' | sort -V | tail -1)
  [ -n "$ver" ] || { echo "no kubernetes source package" >&2; exit 1; }
  dir=$cache/$ver
  if [ -f "$dir/.done" ]; then echo "$ver" >"$cache/version"; return 0; fi
  mkdir -p "$dir/dl" "$dir/bin" "$dir/root"

  step "download sources and tools ($ver)"
  (cd "$dir/dl" && { ls ./*.dsc >/dev/null 2>&1 || apt-get "${apt_opts[@]}" source --download-only "kubernetes=$ver" >/dev/null; })
  (cd "$dir/dl" && apt-get "${apt_opts[@]}" download golang-1.19-go golang-1.19-src etcd-server containernetworking-plugins >/dev/null)
  for deb in "$dir"/dl/*.deb; do dpkg -x "$deb" "$dir/root"; done
  goroot=$dir/root/usr/lib/go-1.19
  [ -x "$goroot/bin/go" ] || { echo "no go in $goroot" >&2; exit 1; }

  step "unpack kubernetes source"
  src=$dir/src
  rm -rf "$src"
  dpkg-source --no-check -x "$dir"/dl/kubernetes_*.dsc "$src" >/dev/null

  gopath=$dir/gopath
  mkdir -p "$gopath/src/k8s.io"
  ln -sfn "$src" "$gopath/src/k8s.io/kubernetes"
  export GOROOT=$goroot GOPATH=$gopath GO111MODULE=off GOFLAGS=-mod=vendor GOCACHE=$dir/gocache \
    PATH=$goroot/bin:$PATH CGO_ENABLED=1 GOTOOLCHAIN=local
  unset GOFLAGS

  step "generate openapi"
  (cd "$gopath/src/k8s.io/kubernetes" && nice -n 19 make gen_openapi >"$dir/gen.log" 2>&1) ||
    { tail -30 "$dir/gen.log"; exit 1; }

  step "go build (-p $jobs)"
  (cd "$gopath/src/k8s.io/kubernetes" &&
    nice -n 19 go build -p "$jobs" -o "$dir/bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
      k8s.io/kubernetes/cmd/kubectl >"$dir/build.log" 2>&1) || { tail -30 "$dir/build.log"; exit 1; }

  step "etcd, CNI plugins, pause"
  cp "$dir/root/usr/bin/etcd" "$dir/bin/"
  mkdir -p "$dir/cni"
  cp -a "$dir/root/usr/lib/cni/." "$dir/cni/"
  printf '%s\n' '#include <signal.h>' '#include <unistd.h>' \
    'static void done(int s) { (void)s; _exit(0); }' \
    'int main(void) { signal(SIGINT, done); signal(SIGTERM, done); for (;;) pause(); }' >"$dir/pause.c"
  gcc -static -O2 -o "$dir/bin/pause" "$dir/pause.c"
  # the Go build cache and the tree are not needed to run: keep only the binaries
  rm -rf "$dir/gocache" "$src" "$gopath" "$dir/root/usr/share/go-1.19"
  touch "$dir/.done"
  echo "$ver" >"$cache/version"
  step ""
}

bindir() { echo "$cache/$(cat "$cache/version")"; }

# --------------------------------------------------------------------------- up / down
status() {
  if [ -f "$cache/version" ]; then echo "binaries: $(bindir) $([ -f "$(bindir)/.done" ] && echo ready || echo incomplete)"; else echo "binaries: not built"; fi
  docker ps -a --filter "name=^/$name\$" --format 'node: {{.Names}} {{.Status}}' | grep . || echo "node: none"
  [ -f "$kubeconfig" ] && echo "kubeconfig: $kubeconfig" || :
}

down() {
  docker rm -f -v "$name" >/dev/null 2>&1 || :
  docker volume rm -f "$name" >/dev/null 2>&1 || :
  docker network rm "$name" >/dev/null 2>&1 || :
  rm -f "$kubeconfig"
}

kubectl() { docker exec "$name" /k8s/bin/kubectl --kubeconfig /var/lib/k8s/admin.kubeconfig "$@"; }

up() {
  build
  local dir
  dir=$(bindir)
  step "start node container"
  down
  docker volume create --label dgw-k8s=1 "$name" >/dev/null
  # its own internal network: the host reaches the API server on the node's address, the
  # node reaches nothing outside (no route out, nothing published)
  docker network create --internal --label dgw-k8s=1 "$name" >/dev/null
  mkdir -p "$dir/node"
  cp "$here/scripts/k8s-node.sh" "$dir/node/start.sh"
  chmod +x "$dir/node/start.sh"
  # Not --privileged (the VM lacks CAP_SYS_RESOURCE; and /proc/sys stays covered, see start.sh).
  docker run -d --name "$name" --hostname "$name" --label dgw-k8s=1 \
    --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --security-opt systempaths=unconfined \
    --device-cgroup-rule 'a *:* rwm' --device /dev/kmsg --device /dev/net/tun --device /dev/fuse \
    --cgroupns=private --network "$name" \
    --tmpfs /run --tmpfs /tmp \
    -v "$name:/var/lib/k8s" -v "$dir/bin:/k8s/bin:ro" -v "$dir/cni:/opt/cni/bin:ro" \
    -v "$dir/node:/k8s/node:ro" -e "PAUSE_IMAGE=$pause_image" \
    --entrypoint /k8s/node/start.sh "$image" >/dev/null

  step "API server ready"
  for _ in $(seq 240); do
    docker exec "$name" test -f /var/lib/k8s/admin.kubeconfig 2>/dev/null &&
      kubectl get --raw /readyz >/dev/null 2>&1 && break
    running || { docker logs --tail 60 "$name"; exit 1; }
    sleep 0.25
  done
  kubectl get --raw /readyz >/dev/null || { docker logs --tail 60 "$name"; exit 1; }

  step "import images"
  docker exec "$name" sh -c 'until ctr -a /run/containerd/containerd.sock version >/dev/null 2>&1; do sleep 0.2; done'
  pause_tar "$dir" | docker exec -i "$name" ctr -a /run/containerd/containerd.sock -n k8s.io images import - >/dev/null
  docker save "$image" | docker exec -i "$name" ctr -a /run/containerd/containerd.sock -n k8s.io images import - >/dev/null

  step "node Ready"
  for _ in $(seq 600); do
    kubectl get node "$name" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True && break
    running || { docker logs --tail 60 "$name"; exit 1; }
    sleep 0.25
  done
  kubectl get node "$name" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' | grep -qx True ||
    { docker exec "$name" tail -40 /var/log/k8s/kubelet.log; exit 1; }

  step "kubeconfig"
  mkdir -p "$(dirname "$kubeconfig")"
  docker exec "$name" cat /var/lib/k8s/admin.kubeconfig >"$kubeconfig.tmp"
  chmod 600 "$kubeconfig.tmp"
  mv "$kubeconfig.tmp" "$kubeconfig"
  step ""
  printf '    %-28s %6.1f s\n' "total" "$(awk "BEGIN { print $(date +%s.%N) - $t0 }")" >&2
  echo "$kubeconfig"
}

running() { [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ]; }

# A docker-save tarball of a one-file image: the static pause binary as the sandbox image.
pause_tar() {
  python3 - "$1/bin/pause" "$pause_image" <<'EOF'
import hashlib, io, json, sys, tarfile
binary, ref = sys.argv[1], sys.argv[2]
layer = io.BytesIO()
with tarfile.open(fileobj=layer, mode="w") as t:
    info = t.gettarinfo(binary, arcname="pause")
    info.mode, info.uid, info.gid = 0o755, 0, 0
    with open(binary, "rb") as f:
        t.addfile(info, f)
layer = layer.getvalue()
diff = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({"architecture": "amd64", "os": "linux",
                     "config": {"Entrypoint": ["/pause"]},
                     "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
cid = hashlib.sha256(config).hexdigest()
out = tarfile.open(fileobj=sys.stdout.buffer, mode="w|")
def add(name, data):
    i = tarfile.TarInfo(name); i.size = len(data); out.addfile(i, io.BytesIO(data))
add(cid + ".json", config)
add("layer/layer.tar", layer)
add("manifest.json", json.dumps([{"Config": cid + ".json", "RepoTags": [ref],
                                  "Layers": ["layer/layer.tar"]}]).encode())
out.close()
EOF
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down; say "removed $name" ;;
  status) status ;;
  *) echo "usage: bash scripts/k8s-cluster.sh up|down|status|build" >&2; exit 2 ;;
esac
