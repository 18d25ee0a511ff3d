#!/usr/bin/env bash
# A cgroup v2 + AppArmor Debian 12 host in a software-emulated VM (issue 18), for the
# modern-host suite (tests/modern/). Run as root on a Debian machine:
#
#   bash scripts/vm-host.sh test [pytest args]    boot, start nothing, run tests/modern from the host
#   bash scripts/vm-host.sh guest CMD [ARGS...]   boot, run CMD inside the guest (in /root/dgw)
#   bash scripts/vm-host.sh host CMD [ARGS...]    boot, run CMD on the host with DGW_VM_* set
#   bash scripts/vm-host.sh build                 only build (or find) the cached guest image
#
# Steps, each timed: install qemu/debootstrap if missing -> guest image (debootstrap bookworm
# with docker.io, apparmor, systemd, linux-image-amd64, ...; cached under $VM_CACHE keyed by
# a hash of the package list and of this script's image-building code, so a second run skips
# it) -> the DinD image on the host (scripts/build-images.sh, as $VM_DIND_IMAGE) and its
# `docker save` (with the gateway's own image, scripts/build-gateway-image.sh) as a read-only
# second disk -> Python wheels of the gateway's dependencies
# (cached by pyproject.toml's hash; the guest has no network) and the project's own wheel -> boot a throw-away qcow2
# overlay with TCG (KVM does not work on this machine: ../shared/notes/vm-here.md), cgroup v2
# and AppArmor on the kernel command line, no network but forwarded 127.0.0.1 ports (the
# guest's sshd, the gateway's port) -> copy the project in (tar over ssh), `docker load` the
# image, a venv from the wheels -> the command -> teardown (always: qemu killed, overlay and
# work dir removed).
#
# Environment: VM_CACHE (/var/cache/dgw-vm)  VM_MEM (4096, MiB)  VM_SMP (2)
#   VM_DIND_IMAGE (dind-gateway/dind:latest; the name build-images.sh builds/tags on the host)
#   VM_BOOT_TIMEOUT (300 s)  MIRROR (as build-images.sh)  VM_KEEP=1 (keep the work dir)
# Exported to `host` / `test` commands: DGW_VM_SSH_PORT, DGW_VM_KEY (root's key for the
# guest), DGW_VM_GATEWAY_PORT (host port forwarded to the guest's 2222), DGW_VM_UNIT_PORT (to
# the guest's 2223, for the packaged gateway), DGW_VM_IMAGE, DGW_VM_DIR (the guest's copy of
# the project), DGW_VM_PYTHON (its venv's python), DGW_VM_WHEELS (the guest's directory of
# wheels: the project's own and its dependencies', for an offline `pip install`),
# DGW_VM_GATEWAY_IMAGE (the gateway's own image, loaded in the guest's engine).
set -euo pipefail

VM_SCRIPT_VERSION=1
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VM_CACHE=${VM_CACHE:-/var/cache/dgw-vm}
VM_MEM=${VM_MEM:-4096}
VM_SMP=${VM_SMP:-2}
VM_DIND_IMAGE=${VM_DIND_IMAGE:-dind-gateway/dind:latest}
# The gateway's own image, built on the host for the guest's compose run and untagged there
# once saved (other sessions share the host's engine).
VM_GATEWAY_IMAGE=dgwvm-gateway:$$
VM_BOOT_TIMEOUT=${VM_BOOT_TIMEOUT:-300}
SUITE=bookworm
GUEST_DIR=/root/dgw
GUEST_GW_PORT=2222
GUEST_UNIT_PORT=2223   # the packaged gateway (systemd unit test), next to the suite's one

GUEST_PACKAGES=(
    # init, devices, network (only the forwarded ports), ssh in
    systemd-sysv udev dbus kmod procps iproute2 ifupdown isc-dhcp-client ca-certificates
    openssh-server openssh-client
    # the modern host: kernel, AppArmor, the engine
    linux-image-amd64 apparmor docker.io iptables
    # what the gateway needs: python, per-user XFS quota disks, the tools it shells out to
    python3 python3-venv e2fsprogs xfsprogs util-linux mount
    # what a rootless-capable host has (not used by the gateway itself) and the test tools
    rootlesskit slirp4netns uidmap rsync curl tar gzip
    # compose.yaml as Debian 12 runs it (v1, tests/modern/test_compose.py)
    docker-compose
)

log() { printf '[vm-host %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
TIMINGS=()
CURRENT_STEP=
# step NAME CMD...: run a step, print and remember how long it took. Not `CMD || ...`: that
# would switch off `set -e` inside CMD; a failing step ends the script (teardown reports it).
step() {
    local name=$1
    shift
    log "step: $name"
    CURRENT_STEP=$name
    STEP_T0=$(now)
    "$@"
    TIMINGS+=("$(printf '%-24s %8s' "$name" "$(elapsed "$STEP_T0")")")
    log "step: $name: $(elapsed "$STEP_T0")"
    CURRENT_STEP=
}
print_timings() {
    [ -z "$CURRENT_STEP" ] || TIMINGS+=("$(printf '%-24s %8s  FAILED' "$CURRENT_STEP" "$(elapsed "$STEP_T0")")")
    [ ${#TIMINGS[@]} -gt 0 ] || return 0
    printf '\n[vm-host] durations:\n' >&2
    printf '  %s\n' "${TIMINGS[@]}" >&2
}

# ------------------------------------------------------------------------------ host tools

install_host_tools() {
    local need=()
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    command -v qemu-img >/dev/null || need+=(qemu-utils)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    command -v ssh >/dev/null || need+=(openssh-client)
    command -v sftp >/dev/null || need+=(openssh-client)
    command -v curl >/dev/null || need+=(curl)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${need[@]}" >/dev/null
    fi
}

# ------------------------------------------------------------------------------ guest image

detect_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk '/^[[:space:]]*#/ { next } /^URIs:/ { for (i = 2; i <= NF; i++) print $i; next }
            $1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' \
            "$f" | grep -E '/debian/?$' | head -n1 || true)
        [ -n "$uri" ] && { printf '%s\n' "${uri%/}"; return 0; }
    done
    echo http://deb.debian.org/debian
}

# Configures the debootstrap'ed tree $1 as a bootable, network-less guest (part of the hash).
setup_rootfs() {
    local r=$1
    echo dgw-vm >"$r/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 dgw-vm\n' >"$r/etc/hosts"
    printf '/dev/vda / ext4 rw,discard,errors=remount-ro 0 1\n' >"$r/etc/fstab"
    printf 'auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet dhcp\n' \
        >"$r/etc/network/interfaces"
    : >"$r/etc/resolv.conf"  # no DNS: the guest reaches no network at all
    mkdir -p "$r/root/.ssh" && chmod 700 "$r/root/.ssh"
    cp "$VM_CACHE/id_vm.pub" "$r/root/.ssh/authorized_keys"
    chmod 600 "$r/root/.ssh/authorized_keys"
    mkdir -p "$r/etc/ssh/sshd_config.d"
    printf 'PermitRootLogin prohibit-password\nUseDNS no\nPasswordAuthentication no\nMaxStartups 100\nMaxSessions 100\n' \
        >"$r/etc/ssh/sshd_config.d/dgw-vm.conf"
    # Nothing periodic (apt, man-db, fstrim...) competing with the tests for the slow CPU.
    rm -f "$r"/etc/systemd/system/timers.target.wants/*
    # Serial console login not needed; no getty competing either.
    rm -f "$r"/etc/systemd/system/getty.target.wants/*
    # The guest's engine: logs to journald only, no userland proxy surprises beyond default.
    mkdir -p "$r/etc/docker"
    printf '{"log-driver": "local"}\n' >"$r/etc/docker/daemon.json"
    # A root password is not set: the only way in is the forwarded ssh port with the key.
    chroot "$r" apt-get clean
    rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/tmp/* "$r"/var/tmp/*
}

image_hash() {
    { echo "$VM_SCRIPT_VERSION $SUITE"; printf '%s\n' "${GUEST_PACKAGES[@]}"; declare -f setup_rootfs; } |
        sha256sum | cut -c1-16
}

ROOTFS=
BUILD_TMP=
cleanup_rootfs() {
    local m
    [ -n "$ROOTFS" ] || return 0
    for m in $(awk -v d="$ROOTFS" 'index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$ROOTFS"
    ROOTFS=
}

build_image() {
    mkdir -p "$VM_CACHE"
    [ -f "$VM_CACHE/id_vm" ] || ssh-keygen -q -t ed25519 -N '' -C dgw-vm -f "$VM_CACHE/id_vm"
    IMG_DIR=$VM_CACHE/image-$(image_hash)
    if [ -f "$IMG_DIR/disk.img" ] && [ -f "$IMG_DIR/vmlinuz" ] && [ -f "$IMG_DIR/initrd.img" ]; then
        log "guest image $IMG_DIR is cached"
        return 0
    fi
    local mirror pkgs tmp
    mirror=${MIRROR:-$(detect_mirror)}
    pkgs=$(IFS=,; echo "${GUEST_PACKAGES[*]}")
    tmp=$(mktemp -d "$VM_CACHE/build.XXXXXX")
    BUILD_TMP=$tmp
    ROOTFS=$tmp/rootfs
    log "debootstrap $SUITE from $mirror ($(echo "$pkgs" | tr ',' ' ' | wc -w) packages)"
    debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$ROOTFS" "$mirror" \
        >"$tmp/debootstrap.log" 2>&1 || { tail -n 30 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
    setup_rootfs "$ROOTFS"
    cp "$ROOTFS"/boot/vmlinuz-* "$tmp/vmlinuz"
    cp "$ROOTFS"/boot/initrd.img-* "$tmp/initrd.img"
    for m in $(awk -v d="$ROOTFS" 'index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m"
    done
    truncate -s 16G "$tmp/disk.img"
    mkfs.ext4 -q -F -L dgw-vm -d "$ROOTFS" "$tmp/disk.img"
    cleanup_rootfs
    rm -rf "$IMG_DIR"
    mkdir -p "$IMG_DIR"
    mv "$tmp/vmlinuz" "$tmp/initrd.img" "$tmp/disk.img" "$IMG_DIR/"
    rm -rf "$tmp"
    BUILD_TMP=
    # Older images of this cache are of no use any more.
    find "$VM_CACHE" -maxdepth 1 -name 'image-*' ! -path "$IMG_DIR" -exec rm -rf {} +
    log "guest image built: $IMG_DIR ($(du -sh --apparent-size "$IMG_DIR/disk.img" | cut -f1) sparse, $(du -sh "$IMG_DIR/disk.img" | cut -f1) used)"
}

# ------------------------------------------------------------------------------ payload

dind_image() {
    docker info >/dev/null 2>&1 || die "the host's Docker engine is not reachable"
    DIND_IMAGE=$VM_DIND_IMAGE bash "$REPO_ROOT/scripts/build-images.sh"
}

gateway_image() {
    PYTHON=$REPO_ROOT/.venv/bin/python bash "$REPO_ROOT/scripts/build-gateway-image.sh" "$VM_GATEWAY_IMAGE"
}

# One `docker save` of both: they share the Debian base's layers.
save_dind() {
    docker save "$VM_DIND_IMAGE" "$VM_GATEWAY_IMAGE" >"$WORK/dind.tar"
    docker rmi "$VM_GATEWAY_IMAGE" >/dev/null
}

wheels() {
    local h py
    py=$REPO_ROOT/.venv/bin/python
    [ -x "$py" ] || { python3 -m venv "$REPO_ROOT/.venv" && "$py" -m pip install -q -e "$REPO_ROOT[test]"; }
    h=$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -c1-16)
    WHEELS=$VM_CACHE/wheels-$h
    [ -d "$WHEELS" ] && { log "wheels cached in $WHEELS"; return 0; }
    rm -rf "$WHEELS.tmp"
    # The guest's python is Debian 12's 3.11 on x86_64, like the host's: binary wheels only.
    "$py" -c 'import tomllib, sys; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
        "$REPO_ROOT/pyproject.toml" >"$WORK/requirements.txt"
    "$py" -m pip download -q --only-binary=:all: --python-version 3.11 \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform linux_x86_64 --implementation cp \
        -d "$WHEELS.tmp" -r "$WORK/requirements.txt"
    cp "$WORK/requirements.txt" "$WHEELS.tmp/"
    # Unpacked on the host (same Python minor version and platform as the guest): the guest
    # then only copies files into its venv; pip in the emulated guest takes over a minute.
    "$py" -m pip install -q --no-index --find-links "$WHEELS.tmp" --no-compile \
        --target "$WHEELS.tmp/site-packages" -r "$WORK/requirements.txt"
    mv "$WHEELS.tmp" "$WHEELS"
}

# The project's own wheel (what an admin installs: tests/modern/test_systemd_unit.py), built
# from the same tree copy_project ships. Not cached: it is this working tree, built each run.
project_wheel() {
    mkdir -p "$WORK/src" "$WORK/project-wheel"
    project_tar | tar -x -C "$WORK/src"
    "$REPO_ROOT/.venv/bin/python" -m pip wheel -q --no-deps -w "$WORK/project-wheel" "$WORK/src"
    rm -rf "$WORK/src"
    ls "$WORK"/project-wheel/dind_gateway-*.whl >&2
}

# ------------------------------------------------------------------------------ the VM

# Three distinct free loopback ports, all sockets held while the kernel picks (one call each
# could hand out the same port twice: CI failed once on exactly that).
free_ports() { "$REPO_ROOT/.venv/bin/python" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'; }

QEMU_PID=
WORK=
teardown() {
    local rc=$?
    cleanup_rootfs
    [ -z "$BUILD_TMP" ] || rm -rf "$BUILD_TMP"
    docker rmi "$VM_GATEWAY_IMAGE" >/dev/null 2>&1 || true
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        log "teardown: stopping qemu (pid $QEMU_PID)"
        kill "$QEMU_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$QEMU_PID" 2>/dev/null || true
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ -n "${VM_KEEP:-}" ]; then
            log "teardown: keeping $WORK (VM_KEEP)"
            rm -f "$WORK/overlay.qcow2" "$WORK/dind.tar"
        else
            [ "$rc" = 0 ] || { log "console log tail:"; tail -n 30 "$WORK/console.log" >&2 || true; }
            rm -rf "$WORK"
        fi
    fi
    print_timings
    exit "$rc"
}

gssh() {
    ssh -p "$SSH_PORT" -i "$VM_CACHE/id_vm" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -o ConnectTimeout=10 \
        -o ServerAliveInterval=15 -o ServerAliveCountMax=8 root@127.0.0.1 "$@"
}

boot() {
    local attempt
    for attempt in 1 2 3; do
        boot_once && return 0
        # Only a port taken between our pick and qemu's bind is retried; anything else ends it.
        grep -q 'Could not set up host forwarding' "$WORK/console.log" || break
        log "a forwarded port was taken meanwhile (attempt $attempt); picking others"
        rm -f "$WORK/overlay.qcow2"
    done
    tail -n 40 "$WORK/console.log" >&2
    die "qemu exited"
}

boot_once() {
    read -r SSH_PORT GW_PORT UNIT_PORT < <(free_ports)
    qemu-img create -q -f qcow2 -b "$IMG_DIR/disk.img" -F raw "$WORK/overlay.qcow2"
    # -accel tcg: /dev/kvm here is kvm_pvm, which runs no stock kernel (vm-here.md).
    # restrict=on: no network for the guest; only the forwarded 127.0.0.1 ports reach it.
    qemu-system-x86_64 -accel tcg,thread=multi,tb-size=512 -cpu max -m "$VM_MEM" -smp "$VM_SMP" \
        -nographic -no-reboot \
        -kernel "$IMG_DIR/vmlinuz" -initrd "$IMG_DIR/initrd.img" \
        -append 'root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.unified_cgroup_hierarchy=1 apparmor=1 security=apparmor panic=-1' \
        -drive "file=$WORK/overlay.qcow2,format=qcow2,if=virtio,cache=unsafe,discard=unmap" \
        -drive "file=$WORK/dind.tar,format=raw,if=virtio,readonly=on" \
        -netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22,hostfwd=tcp:127.0.0.1:$GW_PORT-:$GUEST_GW_PORT,hostfwd=tcp:127.0.0.1:$UNIT_PORT-:$GUEST_UNIT_PORT" \
        -device virtio-net-pci,netdev=n0 \
        -pidfile "$WORK/qemu.pid" </dev/null >"$WORK/console.log" 2>&1 &
    QEMU_PID=$!
    log "qemu pid $QEMU_PID; guest ssh on 127.0.0.1:$SSH_PORT, gateway ports 127.0.0.1:$GW_PORT, 127.0.0.1:$UNIT_PORT"
    # A bounded poll for the guest's sshd (and its engine) to come up.
    local deadline=$((SECONDS + VM_BOOT_TIMEOUT))
    until gssh true 2>/dev/null; do
        kill -0 "$QEMU_PID" 2>/dev/null || { QEMU_PID=; return 1; }
        [ $SECONDS -lt $deadline ] || { tail -n 40 "$WORK/console.log" >&2; die "no ssh into the guest after ${VM_BOOT_TIMEOUT}s"; }
        sleep 2
    done
}

guest_engine() {
    local deadline=$((SECONDS + VM_BOOT_TIMEOUT))
    until gssh docker info >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { gssh 'journalctl -u docker --no-pager | tail -n 30' >&2 || true; die "no engine in the guest"; }
        sleep 2
    done
    gssh 'stat -fc "/sys/fs/cgroup: %T" /sys/fs/cgroup; echo "apparmor: $(cat /sys/module/apparmor/parameters/enabled)";
          docker info -f "engine {{.ServerVersion}}: cgroup v{{.CgroupVersion}} ({{.CgroupDriver}}), {{.SecurityOptions}}"' >&2
}

project_tar() {
    cd "$REPO_ROOT"
    if command -v git >/dev/null && git rev-parse --git-dir >/dev/null 2>&1; then
        # The working tree as it is (tracked and new files, not what .gitignore excludes).
        git ls-files -z --cached --others --exclude-standard |
            xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' | tar --null -T - -c
    else
        tar -c --exclude=./.venv --exclude=./.git --exclude=./.pytest-shims .
    fi
}

copy_project() {
    project_tar | gssh "rm -rf $GUEST_DIR && mkdir -p $GUEST_DIR && tar -x -C $GUEST_DIR"
    tar -c -C "$WHEELS/site-packages" . | gssh "mkdir -p /root/site-packages && tar -x -C /root/site-packages"
    # for `pip install --no-index --find-links /root/wheels dind-gateway` in the guest
    { find "$WHEELS" -maxdepth 1 -name '*.whl' -printf '%f\0'; } |
        tar --null -c -C "$WHEELS" -T - |
        gssh "rm -rf /root/wheels && mkdir -p /root/wheels && tar -x -C /root/wheels"
    tar -c -C "$WORK/project-wheel" . | gssh "tar -x -C /root/wheels"
}

load_dind() {
    # The second disk is `docker save` output (the guest has no registry and no network).
    gssh "docker load -i /dev/vdb && docker image inspect -f '{{.Id}}' '$VM_DIND_IMAGE' '$VM_GATEWAY_IMAGE'" >&2
}

guest_venv() {
    gssh "python3 -m venv --without-pip $GUEST_DIR/.venv && \
        cp -a /root/site-packages/. $GUEST_DIR/.venv/lib/python3.11/site-packages/ && \
        cd $GUEST_DIR && .venv/bin/python -m gateway --help >/dev/null"
}

main() {
    [ "$(id -u)" = 0 ] || die "run as root (debootstrap, qemu, the host's engine)"
    local mode=${1:-}
    [ $# -gt 0 ] && shift
    case $mode in
        build | test | guest | host) ;;
        *) sed -n '2,10p' "$0" >&2; exit 2 ;;
    esac
    trap teardown EXIT
    trap 'exit 143' TERM   # (a CI timeout: the EXIT trap still tears down)
    trap 'exit 130' INT
    # One VM on this machine at a time (2 cores, shared), and one builder of the cache.
    mkdir -p "$VM_CACHE"
    exec 8>"$VM_CACHE/.lock"
    if ! flock -n 8; then
        log "another vm-host.sh runs here; waiting for it (up to 1 h)"
        flock -w 3600 8 || die "the other vm-host.sh did not finish within an hour"
    fi
    step "host tools" install_host_tools
    step "guest image" build_image
    [ "$mode" = build ] && return 0
    WORK=$(mktemp -d /var/tmp/dgwvm.XXXXXX)
    step "dind image (host)" dind_image
    step "gateway image (host)" gateway_image
    step "docker save" save_dind
    step "wheels" wheels
    step "project wheel" project_wheel
    step "boot to ssh" boot
    step "guest engine" guest_engine
    step "copy project" copy_project
    step "docker load (guest)" load_dind
    step "guest venv" guest_venv
    export DGW_VM_SSH_PORT=$SSH_PORT DGW_VM_KEY=$VM_CACHE/id_vm DGW_VM_GATEWAY_PORT=$GW_PORT \
        DGW_VM_GUEST_GATEWAY_PORT=$GUEST_GW_PORT DGW_VM_UNIT_PORT=$UNIT_PORT \
        DGW_VM_GUEST_UNIT_PORT=$GUEST_UNIT_PORT DGW_VM_WHEELS=/root/wheels DGW_VM_IMAGE=$VM_DIND_IMAGE \
        DGW_VM_GATEWAY_IMAGE=$VM_GATEWAY_IMAGE \
        DGW_VM_DIR=$GUEST_DIR DGW_VM_PYTHON=$GUEST_DIR/.venv/bin/python
    case $mode in
        guest) step "command (guest)" gssh "cd $GUEST_DIR && $(printf '%q ' "$@")" ;;
        host) step "command (host)" "$@" ;;
        test) step "modern-host suite" "$REPO_ROOT/.venv/bin/python" -m pytest -ra -p no:cacheprovider \
            "$REPO_ROOT/tests/modern" "$@" ;;
    esac
}

main "$@"
