#!/usr/bin/env bash
# Build the images dind-gateway needs, offline (no container registry required).
#
#   (a) dind-gateway/base:bookworm  - Debian bookworm rootfs made with debootstrap and
#       imported with `docker import`. Carries docker.io (dockerd, containerd, runc, tini),
#       the user tools, and python3 so the gateway's own image can build FROM it offline.
#       Rebuilt when missing or when its package list changed (label
#       dind-gateway.packages-hash); FORCE_BASE=1 rebuilds it.
#   (b) dind-gateway/dind:latest    - images/dind/Dockerfile.debian on top of (a).
#       Skipped when an image already carries the label dind-gateway.context-hash equal to
#       the sha256 of the images/dind/ directory contents AND dind-gateway.base-id equal to
#       the current base image id (so a rebuilt base also triggers a rebuild).
#
# Idempotent; safe to re-run. Needs: docker (daemon reachable), and for (a) root + debootstrap.
#
# Environment overrides:
#   BASE_IMAGE (dind-gateway/base:bookworm)  DIND_IMAGE (dind-gateway/dind:latest)  DIND_DIR
#   SUITE (bookworm)  MIRROR (first deb.debian.org-style URI from /etc/apt/sources.list*,
#   else http://deb.debian.org/debian)  EXTRA_PACKAGES (comma list)  FORCE_BASE=1  FORCE_DIND=1
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=${BASE_IMAGE:-dind-gateway/base:bookworm}
DIND_IMAGE=${DIND_IMAGE:-dind-gateway/dind:latest}
SUITE=${SUITE:-bookworm}
DIND_DIR=${DIND_DIR:-$REPO_ROOT/images/dind}
# installed with the package (gateway/share/scripts/ next to gateway/share/dind/)
[ -d "$DIND_DIR" ] || DIND_DIR=$REPO_ROOT/dind

# Packages for the base. debootstrap resolves Depends (not Recommends) of these.
BASE_PACKAGES=(
    # docker engine + what it wants at runtime (docker.io pulls containerd, runc, tini)
    docker.io iptables ca-certificates pigz xz-utils netbase kmod iproute2
    # what an SSH user expects in their box
    procps bash bash-completion git openssh-sftp-server openssh-client rsync curl sudo less
    nano tini tmux
    # python, also for the gateway's own image
    python3 python3-venv python3-pip
    # rootless inner dockerd (the default `rootless` profile): user namespaces via
    # newuidmap/newgidmap (given file capabilities, no setuid), slirp4netns networking
    rootlesskit slirp4netns uidmap libcap2-bin
    # the gateway's own image (build-gateway-image.sh) is built on this base: per-user disk
    # quotas (mkfs.xfs) and loading the dgw-rootless AppArmor profile (apparmor_parser)
    xfsprogs apparmor
)

log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The mirror apt on this machine uses (deb822 "URIs:" or one-line "deb URI suite ..."),
# preferring an entry that serves the plain Debian archive (not -security).
detect_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk '
            /^[[:space:]]*#/ { next }
            /^URIs:/ { for (i = 2; i <= NF; i++) print $i; next }
            $1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }
        ' "$f" | grep -E '/debian/?$' | head -n1 || true)
        if [ -n "$uri" ]; then
            printf '%s\n' "${uri%/}"
            return 0
        fi
    done
    echo http://deb.debian.org/debian
}

ROOTFS_DIR=
# debootstrap mounts proc/sys inside the target; never rm -rf across a live mount.
cleanup_rootfs() {
    local m d=$ROOTFS_DIR
    [ -n "$d" ] || return 0
    for m in $(awk -v d="$d" 'index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$d" "$d.debootstrap.log"
    ROOTFS_DIR=
}

build_base() {
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    [ "$(id -u)" -eq 0 ] || die "building $BASE_IMAGE needs root (debootstrap)"

    local mirror pkgs t0 dir
    mirror=${MIRROR:-$(detect_mirror)}
    pkgs=$(IFS=,; echo "${BASE_PACKAGES[*]}")
    [ -n "${EXTRA_PACKAGES:-}" ] && pkgs="$pkgs,$EXTRA_PACKAGES"

    dir=$(mktemp -d /var/tmp/dgw-rootfs.XXXXXX)
    ROOTFS_DIR=$dir
    trap cleanup_rootfs EXIT

    log "debootstrap $SUITE from $mirror into $dir"
    t0=$(now)
    debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$dir" "$mirror" \
        >"$dir.debootstrap.log" 2>&1 || {
        tail -n 30 "$dir.debootstrap.log" >&2
        die "debootstrap failed (log tail above)"
    }
    log "debootstrap done in $(elapsed "$t0")"

    # Trim: apt caches and lists, docs stay (small), no init-system bits for dockerd.
    chroot "$dir" apt-get clean
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin \
           "$dir"/var/log/*.log "$dir"/var/log/apt/* "$dir"/tmp/* "$dir"/var/tmp/*
    # The container's hostname/hosts/resolv.conf are provided by docker at run time.
    : >"$dir/etc/hostname"

    log "importing rootfs as $BASE_IMAGE (packages-hash ${BASE_HASH:0:12})"
    t0=$(now)
    tar --numeric-owner --xattrs -C "$dir" -c . \
        | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            --change "LABEL dind-gateway.packages-hash=$BASE_HASH" \
            --message "debootstrap $SUITE minbase from $mirror" \
            - "$BASE_IMAGE" >/dev/null
    log "import done in $(elapsed "$t0")"

    cleanup_rootfs
    trap - EXIT
}

# sha256 over the names, modes and contents of every file in images/dind/.
context_hash() {
    (
        cd "$DIND_DIR"
        find . -type f -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' f; do
            printf '%s %s %s\n' "$(stat -c %a "$f")" "$(sha256sum <"$f" | cut -d' ' -f1)" "$f"
        done
    ) | sha256sum | cut -d' ' -f1
}

build_dind() {
    local hash base_id t0
    hash=$(context_hash)
    base_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")

    # No lookup by these labels: every image made FROM this one carries them too (a test's
    # broken derivative, an admin's own), and the newest such image was once tagged as
    # $DIND_IMAGE here.  The build itself is the check: with its layers cached it takes a
    # second or two and ends at the very same image ID.
    log "building $DIND_IMAGE (context-hash ${hash:0:12}, base ${base_id:7:12}; cached layers are reused)"
    t0=$(now)
    docker build ${FORCE_DIND:+--no-cache} \
        --build-arg "BASE=$BASE_IMAGE" \
        --label "dind-gateway.context-hash=$hash" \
        --label "dind-gateway.base-id=$base_id" \
        -f "$DIND_DIR/Dockerfile.debian" \
        -t "$DIND_IMAGE" \
        "$DIND_DIR"
    log "built $DIND_IMAGE in $(elapsed "$t0")"
}

main() {
    local t_all
    t_all=$(now)
    docker info >/dev/null 2>&1 || die "docker daemon not reachable"

    # The base is rebuilt when its package list changes (its hash is a label of the image).
    BASE_HASH=$(printf '%s\n' "$SUITE" "${BASE_PACKAGES[@]}" "${EXTRA_PACKAGES:-}" | sha256sum | cut -d' ' -f1)
    local have_hash=
    image_exists "$BASE_IMAGE" &&
        have_hash=$(docker image inspect -f '{{index .Config.Labels "dind-gateway.packages-hash"}}' "$BASE_IMAGE")
    if [ -n "${FORCE_BASE:-}" ] || [ "$have_hash" != "$BASE_HASH" ]; then
        build_base
    else
        log "$BASE_IMAGE is up to date (packages-hash ${BASE_HASH:0:12}); not rebuilding (FORCE_BASE=1 to force)"
    fi

    build_dind
    log "all done in $(elapsed "$t_all")"
}

main "$@"
