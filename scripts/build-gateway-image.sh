#!/usr/bin/env bash
# Build the gateway's own image without a registry: Debian base from build-images.sh, Python
# wheels built here on the host (same Python minor version as Debian bookworm's, 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-dind-gateway/gateway:latest}
PY=${PYTHON:-python3}
rm -rf build/wheels
"$PY" -m pip wheel -q -w build/wheels .
docker build -q --build-arg BASE=dind-gateway/base:bookworm \
  --build-arg DGW_PIP_ARGS="--no-index --find-links=/src/build/wheels" \
  --build-arg DGW_PIP_SPEC=dind-gateway -t "$TAG" .
