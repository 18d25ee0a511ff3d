"""compose.yaml as written, on a clean Debian 12 box: the guest's own docker-compose (1.29.2,
v1, from Debian), `privileged` as the file says (this CI machine cannot start privileged
containers: tests/test_gateway_image.py runs it there with an override), the state dir on a
systemd host's shared root (no mount of its own, unlike there), the gateway image built by
scripts/build-gateway-image.sh and loaded by scripts/vm-host.sh (DGW_VM_GATEWAY_IMAGE).

It listens on the guest's 2223 (DGW_VM_UNIT_PORT), which test_systemd_unit.py uses too: the
two run one after the other and each stops its gateway.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ..conftest import GatewayProc, pubkey
from .conftest import Guest, scaled


def banner(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                timeout=scaled(1)) as s:
        s.settimeout(scaled(1))
        return s.recv(4).startswith(b"SSH-")
    return False


class Compose:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.prefix = f"dgwc{secrets.token_hex(3)}"
        self.project = f"{self.prefix}p"
        self.etc = f"/root/{self.prefix}/etc"
        self.state = f"/var/lib/{self.prefix}"  # state_dir: the same path inside and out
        self.env = (f"DGW_ETC_DIR={self.etc} DGW_STATE_DIR={self.state} "
                    f"DGW_GATEWAY_IMAGE={shlex.quote(os.environ['DGW_VM_GATEWAY_IMAGE'])}")

    def __call__(self, *args: str, check: bool = True, timeout: float = scaled(30)) -> str:
        return self.guest.run(f"cd {self.guest.dir} && {self.env} docker-compose --ansi never "
                              f"-p {self.project} -f compose.yaml "
                              + " ".join(map(shlex.quote, args)), check=check,
                              timeout=timeout)

    @property
    def container(self) -> str:
        return f"{self.project}_gateway_1"  # v1's naming


@pytest.fixture
def compose(guest: Guest) -> Iterator[Compose]:
    c = Compose(guest)
    yield c
    print(f"--- {c.container} log tail (guest) ---\n"
          f"{guest.run(f'docker logs --tail 80 {c.container} 2>&1', check=False)}")
    c("down", "-v", "--remove-orphans", check=False)
    flt = f"--filter label=dind-gateway.instance={c.prefix}"
    guest.run(f"docker rm -f $(docker ps -aq {flt}) >/dev/null 2>&1; "
              f"docker network rm $(docker network ls -q {flt}) >/dev/null 2>&1; "
              f"docker volume rm -f $(docker volume ls -q {flt}) >/dev/null 2>&1; "
              f"rm -rf /root/{c.prefix} {c.state}; true", check=False, timeout=scaled(30))


def test_compose_file_starts_the_gateway(guest: Guest, compose: Compose,
                                         keys: dict[str, Path], tmp_path: Path) -> None:
    port = int(os.environ["DGW_VM_UNIT_PORT"])
    guest_port = int(os.environ["DGW_VM_GUEST_UNIT_PORT"])
    c = compose
    # as compose.yaml's header says: init writes ./etc (here DGW_ETC_DIR), the state dir made
    out = guest.run(f"cd {guest.dir} && {guest.python} -m gateway init --dir {c.etc} "
                    f"--state-dir {c.state} && mkdir -p {c.state}")
    assert f"{c.etc}/gateway.yaml: written" in out, out
    conf = yaml.safe_load(guest.run(f"cat {c.etc}/gateway.yaml"))
    # the minimum for this run: the port, a prefix of its own, a ready_timeout for emulation
    conf.update(listen=f"0.0.0.0:{guest_port}", prefix=c.prefix,
                ready_timeout=int(scaled(30)))
    assert conf["image"] == guest.image, conf
    guest.write(f"{c.etc}/gateway.yaml", yaml.safe_dump(conf))
    guest.write(f"{c.etc}/users.yaml", yaml.safe_dump(
        {"users": {"alice": {"keys": [pubkey(keys["alice"])], "disk": "400m"}}}))
    c("up", "-d", "--no-build", timeout=scaled(60))
    assert guest.run(f"docker inspect -f '{{{{.HostConfig.Privileged}}}}' "
                     f"{c.container}").strip() == "true"  # as written: no override here
    deadline = time.monotonic() + scaled(20)
    while not banner(port):
        status = guest.run(f"docker inspect -f '{{{{.State.Status}}}} "
                           f"{{{{.RestartCount}}}}' {c.container}").split()
        assert status == ["running", "0"], (status, guest.run(
            f"docker logs --tail 40 {c.container} 2>&1", check=False))
        assert time.monotonic() < deadline, "the containerised gateway did not listen"
    gw = GatewayProc(tmp_path, keys, prefix=c.prefix)
    gw.port = port
    r = gw.ssh("alice", "echo $USER in $(hostname); docker info -f '{{.SecurityOptions}}'; "
               "df -P -BM ~ | tail -1",
               opts=("-o", f"ConnectTimeout={int(scaled(6))}"), timeout=scaled(90))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "alice in alice-devbox" and "name=rootless" in lines[1], lines
    # her 400m quota disk, made by the gateway in its container (mkfs.xfs from the image)
    assert 330 <= int(lines[2].split()[1].rstrip("M")) <= 400, lines
    # apparmor_parser in the gateway's image, the host's securityfs bound in (compose.yaml):
    # her container runs under dgw-rootless, as with a gateway on the host
    profile = guest.run(f"docker inspect -f '{{{{.AppArmorProfile}}}}' "
                        f"{c.prefix}-alice").strip()
    log = guest.run(f"docker logs {c.container} 2>&1")
    assert profile == "dgw-rootless", (profile, log)
    assert "AppArmor: user containers run under dgw-rootless" in log, log
    # the admin command in the service, over the gateway's control socket
    out = c("exec", "-T", "gateway", "dind-gateway", "purge", "alice", "--yes")
    assert "purged alice" in out, out
    flt = f"--filter label=dind-gateway.instance={c.prefix}"
    assert not guest.run(f"docker ps -aq {flt}; docker network ls -q {flt}; "
                         f"docker volume ls -q {flt}").split()
    c("down", "-v", "--remove-orphans", timeout=scaled(60))
    assert not guest.run(f"docker ps -aq --filter label=com.docker.compose.project="
                         f"{c.project}").split()
    assert not banner(port)
