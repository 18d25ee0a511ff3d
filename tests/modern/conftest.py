"""The modern-host suite's fixtures: a cgroup v2 + AppArmor guest booted by scripts/vm-host.sh.

The gateway runs *in the guest* (as root, with the default `rootless` profile, against the
guest's own engine); every user session comes from the *host's* real OpenSSH client through
the forwarded loopback port. Administrative looks (the guest's cgroup files, the engine,
users.yaml edits) go over a second forwarded port to the guest's sshd as root.

Nothing here skips: without the VM's environment (DGW_VM_*) every test fails.
The guest is software-emulated (6-16x slower than the host): every timeout is scaled by
DGW_VM_SLOWDOWN (default 10).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ..conftest import GatewayProc, pubkey

SLOWDOWN = float(os.environ.get("DGW_VM_SLOWDOWN", "10"))
GUEST_STATE = "/root/mgw"


def scaled(seconds: float) -> float:
    """A host-sized timeout, stretched for the emulated guest."""
    return seconds * SLOWDOWN


class Guest:
    """Root on the guest over its forwarded sshd."""

    def __init__(self) -> None:
        missing = [v for v in ("DGW_VM_SSH_PORT", "DGW_VM_KEY", "DGW_VM_GATEWAY_PORT",
                               "DGW_VM_IMAGE", "DGW_VM_DIR", "DGW_VM_PYTHON")
                   if not os.environ.get(v)]
        if missing:
            pytest.fail(f"no VM: {', '.join(missing)} unset; run `bash scripts/vm-host.sh test`",
                        pytrace=False)
        self.port = int(os.environ["DGW_VM_SSH_PORT"])
        self.key = os.environ["DGW_VM_KEY"]
        self.gateway_port = int(os.environ["DGW_VM_GATEWAY_PORT"])
        self.guest_gateway_port = int(os.environ.get("DGW_VM_GUEST_GATEWAY_PORT", "2222"))
        self.image = os.environ["DGW_VM_IMAGE"]
        self.dir = os.environ["DGW_VM_DIR"]
        self.python = os.environ["DGW_VM_PYTHON"]

    def run(self, command: str, timeout: float = scaled(30), check: bool = True,
            input: bytes | None = None) -> str:
        r = subprocess.run(
            ["ssh", "-p", str(self.port), "-i", self.key, "-o", "IdentitiesOnly=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
            input=input, capture_output=True, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL)
        out = r.stdout.decode(errors="replace")
        if check and r.returncode != 0:
            raise AssertionError(f"guest: {command!r} exited {r.returncode}:\n{out}"
                                 f"{r.stderr.decode(errors='replace')}")
        return out

    def write(self, path: str, text: str) -> None:
        """Atomically (a rename), so the gateway's reloader never sees half a file."""
        q = shlex.quote(path)
        self.run(f"mkdir -p $(dirname {q}) && cat > {q}.tmp && mv -f {q}.tmp {q}",
                 input=text.encode())


class VMGateway(GatewayProc):
    """`dind-gateway serve` in the guest; OpenSSH from the host through the forwarded port."""

    def __init__(self, guest: Guest, workdir: Path, keys: dict[str, Path], **settings: object):
        super().__init__(workdir, keys, prefix=f"dgwvm{secrets.token_hex(3)}", **settings)
        self.guest = guest
        self.port = guest.gateway_port  # where the host's clients connect
        self.state = f"{GUEST_STATE}/{self.prefix}"
        self.settings.update({"listen": f"0.0.0.0:{guest.guest_gateway_port}",
                              "image": guest.image, "ready_timeout": int(scaled(30)),
                              "state_dir": "state"})

    def write_users(self, users: dict[str, dict], defaults: dict | None = None) -> None:
        doc: dict = {"users": users}
        if defaults:
            doc["defaults"] = defaults
        self.guest.write(f"{self.state}/users.yaml", yaml.safe_dump(doc, sort_keys=False))

    def start(self, timeout: float = scaled(20)) -> None:
        g = self.guest
        g.run(f"mkdir -p {self.state}")
        g.write(f"{self.state}/gateway.yaml", yaml.safe_dump(self.settings, sort_keys=False))
        if g.run(f"test -f {self.state}/users.yaml && echo yes", check=False).strip() != "yes":
            self.write_users(self.default_users())
        # a transient systemd unit: detached from this ssh session, stopped at teardown
        g.run(f"systemd-run --quiet --unit={self.prefix} --working-directory={g.dir} "
              f"--property=StandardOutput=append:{self.state}/gateway.log "
              f"--property=StandardError=append:{self.state}/gateway.log "
              f"{g.python} -m gateway serve --config {self.state}/gateway.yaml")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if g.run(f"systemctl is-active {self.prefix}", check=False).strip() != "active":
                raise RuntimeError(f"gateway exited in the guest:\n{self.tail()}")
            # qemu's port forward accepts at once; the banner proves the gateway answered
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=scaled(1)) as s:
                s.settimeout(scaled(1))
                if s.recv(4).startswith(b"SSH-"):
                    return
        raise RuntimeError(f"gateway did not listen:\n{self.tail()}")

    def stop(self, sig: int = 15) -> None:
        self.guest.run(f"systemctl kill --signal={sig} {self.prefix}; for i in $(seq 100); do "
                       f"systemctl is-active -q {self.prefix} || break; sleep 0.2; done; "
                       f"systemctl stop {self.prefix}; systemctl reset-failed {self.prefix}",
                       check=False, timeout=scaled(10))

    def tail(self, n: int = 60) -> str:
        return self.guest.run(f"tail -n {n} {self.state}/gateway.log", check=False)

    def ssh(self, user: str, *command: str, key: str | None = None, opts: tuple = (),
            input: bytes | None = None, timeout: float = scaled(60)) -> subprocess.CompletedProcess:
        return super().ssh(user, *command, key=key, opts=(*opts, "-o",
                                                          f"ConnectTimeout={int(scaled(6))}"),
                           input=input, timeout=timeout)

    def inspect(self, user: str, fmt: str) -> str:
        return self.guest.run(f"docker inspect -f {shlex.quote(fmt)} "
                              f"{self.container_name(user)}").strip()

    def cgroup_dir(self, user: str) -> str:
        """Her container's cgroup on the guest (cgroup v2: one unified hierarchy)."""
        cid = self.inspect(user, "{{.Id}}")
        return self.guest.run(f"find /sys/fs/cgroup -maxdepth 3 -type d -name '*{cid}*' "
                              f"| head -n 1").strip()

    def teardown_guest(self) -> None:
        self.stop()
        print(f"--- gateway {self.prefix} log tail (guest) ---\n{self.tail(150)}")
        flt = f"--filter label=dind-gateway.instance={self.prefix}"
        self.guest.run(f"docker rm -f $(docker ps -aq {flt}) >/dev/null 2>&1; "
                       f"docker network rm $(docker network ls -q {flt}) >/dev/null 2>&1; "
                       f"awk '$5 ~ \"^{self.state}/\" {{print $5}}' /proc/self/mountinfo | "
                       f"sort -r | xargs -r -n1 umount; "
                       f"docker volume rm -f $(docker volume ls -q {flt}) >/dev/null 2>&1; true",
                       check=False, timeout=scaled(30))


@pytest.fixture(scope="session")
def guest() -> Guest:
    g = Guest()
    fs = g.run("stat -fc %T /sys/fs/cgroup").strip()
    assert fs == "cgroup2fs", f"the guest is not a cgroup v2 host: {fs}"
    return g


USER_LIMITS = {"memory": "512m", "pids": 300, "cpus": 1, "disk": "300m"}


def vm_users(keys: dict[str, Path], **alice: object) -> dict[str, dict]:
    users = {u: {"keys": [pubkey(keys[u])], **USER_LIMITS} for u in ("alice", "bob")}
    users["alice"].update(alice)
    return users


@pytest.fixture(scope="session")
def vmgw(guest: Guest, tmp_path_factory: pytest.TempPathFactory,
         keys: dict[str, Path]) -> Iterator[VMGateway]:
    """The gateway in the guest, default profile (nothing set), alice and bob with caps."""
    gw = VMGateway(guest, tmp_path_factory.mktemp("vmgw"), keys)
    gw.write_users(vm_users(keys))
    gw.start()
    yield gw
    gw.teardown_guest()
