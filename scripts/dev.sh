#!/usr/bin/env bash
# One entry point for a fresh Debian machine (run as root):
#   bash scripts/dev.sh run    install what is missing, build the images, serve config/
#   bash scripts/dev.sh test   same set-up, then the whole test suite
# Every step is skipped when its result is already there, so repeated runs are quick.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_pkgs=()
command -v dockerd >/dev/null || need_pkgs+=(docker.io)
command -v iptables >/dev/null || need_pkgs+=(iptables)
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v ssh >/dev/null || need_pkgs+=(openssh-client)
command -v plink >/dev/null && command -v puttygen >/dev/null || need_pkgs+=(putty-tools)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
[ -x /usr/lib/openssh/sftp-server ] || need_pkgs+=(openssh-sftp-server)
command -v rsync >/dev/null || need_pkgs+=(rsync)
command -v curl >/dev/null || need_pkgs+=(curl)
command -v git >/dev/null || need_pkgs+=(git)  # tests: git over ssh
command -v mkfs.xfs >/dev/null || need_pkgs+=(xfsprogs)  # per-user disk quotas
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)  # tests: verify the unit
command -v docker-compose >/dev/null || need_pkgs+=(docker-compose)  # tests: up compose.yaml (v1)
command -v docker-registry >/dev/null || need_pkgs+=(docker-registry)  # tests: registry mirror
python3 -c 'import ensurepip, venv' 2>/dev/null || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  say "installing ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  say "starting dockerd"
  setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/dockerd.log; exit 1; }
fi

if [ ! -x .venv/bin/dind-gateway ] || [ pyproject.toml -nt .venv/.installed ]; then
  say "creating .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch .venv/.installed
fi

bash scripts/build-images.sh

case "${1:-}" in
  run)
    shift
    exec .venv/bin/dind-gateway serve --config config/gateway.yaml "$@"
    ;;
  test)
    shift
    .venv/bin/ruff check gateway tests bench
    exec .venv/bin/python -m pytest -ra "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh run|test [args]" >&2
    exit 2
    ;;
esac
