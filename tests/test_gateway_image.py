"""The gateway's own Dockerfile builds offline and the containerised gateway serves logins."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import docker
import yaml

from .conftest import IMAGE, ROOT, GatewayProc, free_port, pubkey, remove_labelled


def test_gateway_image_builds_offline_and_serves(docker_client: docker.DockerClient,
                                                 keys: dict[str, Path],
                                                 tmp_path: Path) -> None:
    tag = f"dind-gateway/gateway:test-{secrets.token_hex(3)}"
    build = subprocess.run(["bash", "scripts/build-gateway-image.sh", tag], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHON": sys.executable})
    assert build.returncode == 0, build.stdout + build.stderr
    prefix = f"dgwi{secrets.token_hex(3)}"
    port = free_port()
    conf = tmp_path / "etc"
    conf.mkdir()
    (conf / "gateway.yaml").write_text(yaml.safe_dump({
        "listen": f"127.0.0.1:{port}", "users_file": "users.yaml",
        "state_dir": "/var/lib/dind-gateway", "image": IMAGE, "prefix": prefix}))
    (conf / "users.yaml").write_text(yaml.safe_dump(
        {"users": {"alice": {"keys": [pubkey(keys["alice"])]}}}))
    name = f"{prefix}-gateway"
    container = docker_client.containers.run(
        tag, name=name, detach=True, network_mode="host",
        labels={"dind-gateway.instance": prefix},
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(conf): {"bind": "/etc/dind-gateway", "mode": "ro"},
                 str(tmp_path / "state"): {"bind": "/var/lib/dind-gateway", "mode": "rw"}})
    try:
        gw = GatewayProc(tmp_path, keys, prefix=prefix)
        gw.port = port
        deadline = time.monotonic() + 60
        while b"listening" not in container.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        r = gw.ssh("alice", "echo $USER in $(hostname)")
        assert r.returncode == 0, (r.stderr, container.logs()[-2000:])
        assert r.stdout == b"alice in alice-devbox\n"
        host_key = tmp_path / "state" / "ssh_host_ed25519_key"
        assert host_key.exists() and (host_key.stat().st_mode & 0o777) == 0o600
        container.stop(timeout=15)
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0, container.logs()[-2000:]
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        remove_labelled(docker_client, prefix)
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag, force=True)
