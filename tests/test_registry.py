"""The shared image cache: a registry mirror (Debian's docker-registry, in a container made from
the local base image) for every inner daemon, and images preloaded from the host engine."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import secrets
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from .conftest import GatewayProc, free_port

BASE = "dind-gateway/base:bookworm"
REGISTRY_BIN = "/usr/bin/docker-registry"


def tiny_image(client: docker.DockerClient, tag: str, text: str) -> None:
    """A one-file image FROM scratch, built here (no registry needed)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dockerfile = f"FROM scratch\nCOPY hello.txt /\nLABEL dgw.test={text}\n"
        for name, data in (("Dockerfile", dockerfile), ("hello.txt", text + "\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data.encode())
            tar.addfile(info, io.BytesIO(data.encode()))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path],
          docker_client: docker.DockerClient) -> Iterator[dict]:
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry is not installed (scripts/dev.sh installs it)")
    tmp = tmp_path_factory.mktemp("registry")
    token = secrets.token_hex(3)
    prefix = f"dgwr{token}"
    (tmp / "registry.yml").write_text(
        "version: 0.1\nlog: {level: warn}\n"
        "storage: {filesystem: {rootdirectory: /var/lib/registry}}\n"
        "http: {addr: 0.0.0.0:5000}\n")
    # the registry in a container of its own; published on the host's loopback only, for the
    # host engine to push to
    host_port = free_port()
    mirror = docker_client.containers.run(
        BASE, ["docker-registry", "serve", "/etc/docker-registry.yml"], detach=True,
        name=f"{prefix}-mirror", labels={"dind-gateway.instance": prefix},
        ports={"5000/tcp": ("127.0.0.1", host_port)},
        volumes={REGISTRY_BIN: {"bind": "/usr/local/bin/docker-registry", "mode": "ro"},
                 str(tmp / "registry.yml"): {"bind": "/etc/docker-registry.yml", "mode": "ro"}})
    upstream = f"dgwtiny{token}:1"  # docker.io/library/dgwtiny...: only the mirror has it
    pushed = f"127.0.0.1:{host_port}/library/{upstream}"
    preloaded = f"dgwpre{token}:1"
    made = [pushed, preloaded]
    gw = None
    try:
        tiny_image(docker_client, pushed, f"mirrored-{token}")
        tiny_image(docker_client, preloaded, f"preloaded-{token}")
        for line in docker_client.images.push(pushed, stream=True, decode=True):
            assert "error" not in line, line
        gw = GatewayProc(tmp / "gw", keys, prefix=prefix,
                         registry_mirror=f"http://{mirror.name}:5000",
                         preload_images=[preloaded])
        gw.dir.mkdir()
        gw.start()
        yield {"gw": gw, "mirror": mirror, "upstream": upstream, "preloaded": preloaded,
               "token": token, "host_port": host_port}
    finally:
        if gw is not None:
            gw.stop()
            print(f"--- gateway log tail ---\n{gw.tail(80)}")
        with contextlib.suppress(docker.errors.NotFound):
            mirror.remove(force=True)
        if gw is not None:
            gw.teardown(docker_client)
        for tag in made:
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(tag, force=True)


def sh(gw: GatewayProc, user: str, command: str) -> tuple[int, str, str]:
    r = gw.ssh(user, command)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def test_preloaded_image_is_there_at_first_login(cache: dict) -> None:
    gw = cache["gw"]
    code, out, err = sh(gw, "alice", "docker images --format '{{.Repository}}:{{.Tag}}'")
    assert code == 0, (out, err, gw.tail())
    assert cache["preloaded"] in out.split(), (out, err)
    assert f"Loading image {cache['preloaded']}" in err and "done in" in err, err
    code, out, _ = sh(gw, "alice", "docker image inspect -f '{{index .Config.Labels "
                                   "\"dgw.test\"}}' " + cache["preloaded"])
    assert out.strip() == f"preloaded-{cache['token']}"
    # the next login loads nothing again
    code, out, err = sh(gw, "alice", "true")
    assert code == 0 and "Loading image" not in err, err


def test_pull_by_upstream_name_through_the_mirror(cache: dict, docker_client) -> None:
    gw = cache["gw"]
    net = docker_client.networks.get(gw.container_name("alice"))
    mirror_ip = cache["mirror"].client.api.inspect_container(cache["mirror"].id)[
        "NetworkSettings"]["Networks"][net.name]["IPAddress"]
    code, out, err = sh(gw, "alice", "cat /etc/docker/dgw-daemon.json")
    assert f'"registry-mirrors": ["http://{mirror_ip}:5000"]' in out, out
    # no internet here, and the name exists nowhere but in the mirror
    code, out, err = sh(gw, "alice", f"docker pull -q {cache['upstream']} && docker image "
                                     "inspect -f '{{index .Config.Labels \"dgw.test\"}}' "
                                     f"{cache['upstream']}")
    assert code == 0, (out, err, gw.tail())
    assert out.strip().splitlines()[-1] == f"mirrored-{cache['token']}", out
    # her daemon's configuration is root's: she cannot point it elsewhere
    code, out, err = sh(gw, "alice", "echo {} > /etc/docker/dgw-daemon.json")
    assert code != 0


def test_the_mirror_opens_nothing_else(cache: dict, docker_client) -> None:
    gw = cache["gw"]
    assert sh(gw, "bob", "true")[0] == 0
    alice = docker_client.api.inspect_container(gw.container_name("alice"))
    net = alice["NetworkSettings"]["Networks"][gw.container_name("alice")]
    bob = docker_client.api.inspect_container(gw.container_name("bob"))
    bob_ip = bob["NetworkSettings"]["Networks"][gw.container_name("bob")]["IPAddress"]
    mirror_ip = docker_client.api.inspect_container(cache["mirror"].id)[
        "NetworkSettings"]["Networks"][gw.container_name("alice")]["IPAddress"]
    subnet = ipaddress.ip_network(docker_client.networks.get(gw.container_name("alice")).attrs[
        "IPAM"]["Config"][0]["Subnet"])
    assert mirror_ip == str(subnet.broadcast_address - 1), mirror_ip  # the last of her /28
    code, out, _ = sh(gw, "alice", f"curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 "
                                   f"http://{mirror_ip}:5000/v2/")
    assert out == "200", out
    # the registry's port published on the host's loopback, the gateway's SSH port, another
    # port of the mirror container, bob (whose network has the mirror too)
    for url in (f"http://{net['Gateway']}:{cache['host_port']}/v2/",
                f"http://{net['Gateway']}:{gw.port}/", f"http://{mirror_ip}:22/",
                f"http://{mirror_ip}:2375/", f"http://{bob_ip}:22/",
                f"http://{bob_ip}:2375/"):
        code, out, _ = sh(gw, "alice", f"curl -s -o /dev/null --max-time 3 {url}; echo rc=$?")
        assert out.strip() != "rc=0", (url, out)


def test_purge_detaches_the_mirror(cache: dict, docker_client) -> None:
    gw = cache["gw"]
    assert sh(gw, "bob", "true")[0] == 0
    net = gw.container_name("bob")
    mirror = cache["mirror"]
    mirror.reload()
    assert net in mirror.attrs["NetworkSettings"]["Networks"]
    r = subprocess.run([sys.executable, "-m", "gateway", "purge", "bob", "--yes", "--config",
                        str(gw.config)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr, gw.tail())
    assert not docker_client.networks.list(names=[net])
    mirror.reload()
    assert net not in mirror.attrs["NetworkSettings"]["Networks"]
    assert mirror.status == "running"
