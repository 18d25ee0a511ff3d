#!/bin/bash
# PID 1 of the one-node cluster's container (started by scripts/k8s-cluster.sh): etcd,
# kube-apiserver, controller-manager, scheduler, containerd and the kubelet.  State (etcd,
# certificates, containerd, volumes) is on /var/lib/k8s, so a restarted node keeps its pods.
set -u
K=/k8s/bin
S=/var/lib/k8s
L=/var/log/k8s
NAME=$(hostname)
mkdir -p "$S" "$L" /run/sysctl
log() { echo "node: $*"; }

# --- never let anything here change the host's kernel: the kubelet writes these global
# sysctls at start; files bind-mounted over them take the writes instead.
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
  kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
  key=${kv%%=*} val=${kv#*=}
  f=/run/sysctl/${key//\//.}
  echo "$val" >"$f"
  mount --bind "$f" "/proc/sys/$key" || { log "cannot cover /proc/sys/$key: refusing to start"; exit 1; }
done

# --- cgroups and /sys writable (what dind-init does for the privileged profile)
mount -o remount,rw /sys 2>/dev/null
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then # cgroup v2
  mount -o remount,rw /sys/fs/cgroup 2>/dev/null || mount -o remount,bind,rw /sys/fs/cgroup
  mkdir -p /sys/fs/cgroup/init
  for _ in 1 2 3 4 5; do
    for p in $(cat /sys/fs/cgroup/cgroup.procs); do echo "$p" >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null; done
  done
  for c in $(cat /sys/fs/cgroup/cgroup.controllers); do echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null; done
else # cgroup v1: the tmpfs and every hierarchy read-write (a bind remount; "busy" otherwise)
  mount -o remount,bind,rw /sys/fs/cgroup 2>/dev/null || mount -o remount,rw /sys/fs/cgroup
  for mp in $(awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup") print $5; break } }' /proc/self/mountinfo); do
    mount -o remount,bind,rw "$mp" || log "cannot make $mp writable"
  done
fi
mount --make-rshared / 2>/dev/null

# --- the node's address: eth0 of its private, internal Docker network
IP=$(ip -4 -o addr show dev eth0 | awk '{ print $4 }' | cut -d/ -f1)
[ -n "$IP" ] || { log "no address on eth0"; exit 1; }
echo "$IP" >"$S/node-ip"
ip link set lo up

# --- certificates: one CA; one serving certificate (API server and kubelet); one client
# certificate in system:masters for every component (a test cluster, not a production one)
P=$S/pki
mkdir -p "$P"
cd "$P"
if [ ! -f ca.key ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=dgw-k8s-ca 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=admin" 2>/dev/null
  openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 2>/dev/null
fi
if [ "$(cat serving.ip 2>/dev/null)" != "$IP" ]; then
  printf 'subjectAltName=IP:%s,IP:127.0.0.1,IP:10.96.0.1,DNS:%s,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:localhost\n' "$IP" "$NAME" >san.ext
  openssl req -newkey rsa:2048 -nodes -keyout serving.key -out serving.csr -subj "/CN=$NAME" 2>/dev/null
  openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out serving.crt -days 3650 -extfile san.ext 2>/dev/null
  echo "$IP" >serving.ip
fi
kubeconfig() { # kubeconfig SERVER: admin credentials, CA inline
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dgw-k8s
  cluster:
    server: $1
    certificate-authority-data: $(base64 -w0 <"$P/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 <"$P/admin.crt")
    client-key-data: $(base64 -w0 <"$P/admin.key")
contexts:
- name: dgw-k8s
  context: {cluster: dgw-k8s, user: admin}
current-context: dgw-k8s
EOF
}
kubeconfig "https://127.0.0.1:6443" >"$S/local.kubeconfig"
cd /

# --- containerd with the CRI plugin
mkdir -p /run/cni/net.d /run/containerd "$S/containerd"
cat >/run/containerd/config.toml <<EOF
version = 2
root = "$S/containerd"
state = "/run/containerd/state"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/${PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/run/cni/net.d"
EOF
cat >/run/cni/net.d/10-dgw.conflist <<'EOF'
{"cniVersion": "0.4.0", "name": "dgw-pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF

pids=()
run() { # run NAME CMD...: in the background, log to $L/NAME.log
  local n=$1
  shift
  "$@" >"$L/$n.log" 2>&1 &
  pids+=($!)
}

run containerd containerd --config /run/containerd/config.toml
run etcd $K/etcd --name "$NAME" --data-dir "$S/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster "$NAME=http://127.0.0.1:2380" --quota-backend-bytes 1073741824
run apiserver $K/kube-apiserver --etcd-servers http://127.0.0.1:2379 \
  --bind-address 0.0.0.0 --secure-port 6443 --advertise-address "$IP" --insecure-port 0 \
  --tls-cert-file "$P/serving.crt" --tls-private-key-file "$P/serving.key" \
  --client-ca-file "$P/ca.crt" --service-account-key-file "$P/sa.pub" \
  --service-account-signing-key-file "$P/sa.key" \
  --service-account-issuer https://kubernetes.default.svc --api-audiences https://kubernetes.default.svc \
  --authorization-mode Node,RBAC --allow-privileged=true \
  --service-cluster-ip-range 10.96.0.0/16 \
  --kubelet-client-certificate "$P/admin.crt" --kubelet-client-key "$P/admin.key" \
  --kubelet-certificate-authority "$P/ca.crt" --kubelet-preferred-address-types InternalIP \
  --enable-admission-plugins NodeRestriction

until $K/kubectl --kubeconfig "$S/local.kubeconfig" get --raw /readyz >/dev/null 2>&1; do
  kill -0 "${pids[2]}" 2>/dev/null || { log "kube-apiserver exited"; tail -30 "$L/apiserver.log"; exit 1; }
  sleep 0.2
done
# the cluster's outside kubeconfig names the node's address (the host reaches it directly)
kubeconfig "https://$IP:6443" >"$S/admin.kubeconfig.tmp" && mv "$S/admin.kubeconfig.tmp" "$S/admin.kubeconfig"
log "API server ready"

run controller-manager $K/kube-controller-manager --kubeconfig "$S/local.kubeconfig" \
  --leader-elect=false --service-account-private-key-file "$P/sa.key" \
  --root-ca-file "$P/ca.crt" --use-service-account-credentials=false \
  --controllers '*,-nodeipam,-service,-route,-cloud-node-lifecycle' --cluster-cidr 10.244.0.0/16 \
  --pvclaimbinder-sync-period 1s
run scheduler $K/kube-scheduler --kubeconfig "$S/local.kubeconfig" --leader-elect=false

cat >/run/kubelet.yaml <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$P/ca.crt"}
authorization: {mode: AlwaysAllow}
tlsCertFile: "$P/serving.crt"
tlsPrivateKeyFile: "$P/serving.key"
cgroupDriver: cgroupfs
failSwapOn: false
protectKernelDefaults: false
makeIPTablesUtilChains: false
serializeImagePulls: false
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
containerLogMaxSize: 10Mi
EOF
run kubelet $K/kubelet --kubeconfig "$S/local.kubeconfig" --config /run/kubelet.yaml \
  --container-runtime remote --container-runtime-endpoint unix:///run/containerd/containerd.sock \
  --node-ip "$IP" --hostname-override "$NAME" --root-dir "$S/kubelet" --v 1

log "started: ${pids[*]}"
trap 'kill "${pids[@]}" 2>/dev/null; wait; exit 0' TERM INT
# a component that dies takes the node down (the test fixture sees it, logs are in $L)
wait -n "${pids[@]}"
log "a component exited"
for f in "$L"/*.log; do echo "--- $f"; tail -15 "$f"; done
kill "${pids[@]}" 2>/dev/null
exit 1
