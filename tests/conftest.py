"""End-to-end fixtures: a real gateway process, a real Docker engine, real OpenSSH clients.

Nothing here skips when Docker is missing: a test run without an engine fails loudly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("DGW_TEST_IMAGE", "dind-gateway/dind:latest")
USERS = ("alice", "bob", "carol", "dave", "erin")
# tests/modern/ runs against the cgroup v2 + AppArmor VM only (`bash scripts/vm-host.sh test`
# boots it and sets DGW_VM_*); the plain run does not collect it.
collect_ignore = [] if os.environ.get("DGW_VM_SSH_PORT") else ["modern"]


_NO_BARE = """#!/bin/sh
echo "a test started a bare '$(basename "$0")' from PATH; use sys.executable" >&2
exit 127
"""


def pytest_configure(config: pytest.Config) -> None:
    """Shadow python/pip on PATH for the whole run, so a bare `python` in a test fails here
    exactly as it would on a fresh machine where only .venv has the dependencies."""
    shims = Path(config.rootpath) / ".pytest-shims"
    shims.mkdir(exist_ok=True)
    for name in ("python", "python3", "pip", "pip3"):
        path = shims / name
        path.write_text(_NO_BARE)
        path.chmod(0o755)
    os.environ["PATH"] = f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll a condition until it holds or the deadline passes; the last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def container_status(client: docker.DockerClient, name: str) -> str:
    try:
        return client.containers.get(name).status
    except docker.errors.NotFound:
        return "missing"


def processes(client: docker.DockerClient, name: str) -> list[str]:
    """Command lines of the processes running in a container (empty if it is not running)."""
    try:
        out = client.containers.get(name).exec_run(["ps", "-eo", "args"]).output
    except (docker.errors.NotFound, docker.errors.APIError):
        return []
    return out.decode(errors="replace").splitlines()[1:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def host_firewall_left_as_found() -> Iterator[None]:
    """Gateways started by tests add their INPUT rules (docker/firewall.py, kept when a gateway
    stops, as in production); the run takes them out again unless the host had the chain
    before it (a real gateway on this machine: its rules are not ours to touch)."""
    from gateway.backend.docker.firewall import HostFirewall
    fw = HostFirewall(ipaddress.IPv4Network("10.213.0.0/16"))
    had_chain = fw.chain_exists()
    yield
    if not had_chain:
        fw.remove_all()


@pytest.fixture(scope="session")
def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - report whatever it is
        pytest.fail(f"no Docker engine reachable ({exc}); run scripts/dev.sh test", pytrace=False)
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} missing; run scripts/build-images.sh", pytrace=False)
    return client


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One ed25519 key pair per test user, plus a spare ('other') nobody has registered."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in (*USERS, "other", "alice2"):
        path = d / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(path)], check=True)
        out[name] = path
    return out


def pubkey(path: Path) -> str:
    return path.with_suffix(".pub").read_text().strip()


def unmount_under(path: Path) -> None:
    """Unmount the quota disks a gateway left mounted below its state directory."""
    base = os.fspath(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh if line.split()[4].startswith(base)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", point], check=False)


def remove_labelled(client: docker.DockerClient, prefix: str) -> None:
    flt = {"label": f"dind-gateway.instance={prefix}"}
    for c in client.containers.list(all=True, filters=flt):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)
    for n in client.networks.list(filters=flt):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            n.remove()
    for v in client.volumes.list(filters=flt):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            v.remove(force=True)


class GatewayProc:
    """A `dind-gateway serve` subprocess with its own config, state dir and Docker prefix."""

    def __init__(self, workdir: Path, keys: dict[str, Path], prefix: str | None = None,
                 **settings: object) -> None:
        self.dir = workdir
        self.keys = keys
        self.prefix = prefix or f"dgwt{secrets.token_hex(3)}"
        self.port = free_port()
        self.config = self.dir / "gateway.yaml"
        self.users_file = self.dir / "users.yaml"
        self.log = self.dir / "gateway.log"
        self.settings = {"listen": f"127.0.0.1:{self.port}", "users_file": "users.yaml",
                         "state_dir": "state", "image": IMAGE, "prefix": self.prefix,
                         "ready_timeout": 60, "log_level": "debug",
                         # every test client comes from 127.0.0.1, many on purpose with bad
                         # keys: the brute-force guard is tested with its own settings
                         "ban_threshold": 100000, "max_startups_per_source": 500,
                         "noauth_burst": 100000, **settings}
        self.proc: subprocess.Popen[bytes] | None = None

    def write_users(self, users: dict[str, dict], defaults: dict | None = None) -> None:
        doc: dict = {"users": users}
        if defaults:
            doc["defaults"] = defaults
        tmp = self.users_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        tmp.replace(self.users_file)

    def default_users(self) -> dict[str, dict]:
        return {u: {"keys": [pubkey(self.keys[u])], "memory": "1g", "pids": 1000, "cpus": 1}
                for u in USERS}

    def start(self, timeout: float = 20) -> None:
        self.config.write_text(yaml.safe_dump(self.settings, sort_keys=False))
        if not self.users_file.exists():
            self.write_users(self.default_users())
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
            cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not listen:\n{self.tail()}")

    def stop(self, sig: int = 15) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def ssh_args(self, user: str, key: str | None = None, *opts: str) -> list[str]:
        # ssh takes the first value given for an option: test-specific options go first.
        return ["ssh", *opts, "-p", str(self.port), "-i", str(self.keys[key or user]),
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", f"{user}@127.0.0.1"]

    def ssh(self, user: str, *command: str, key: str | None = None, opts: tuple = (),
            input: bytes | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run the real OpenSSH client; stdout/stderr captured as bytes."""
        return subprocess.run([*self.ssh_args(user, key, *opts), *command], input=input,
                              capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def container_name(self, user: str) -> str:
        return f"{self.prefix}-{user}"

    def teardown(self, client: docker.DockerClient, lines: int = 100) -> None:
        """Stop, show the log tail, and remove every object and quota mount it made."""
        self.stop()
        print(f"--- gateway {self.prefix} log tail ---\n{self.tail(lines)}")
        remove_labelled(client, self.prefix)
        unmount_under(self.dir)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path],
            docker_client: docker.DockerClient) -> Iterator[GatewayProc]:
    """The shared gateway for most tests, with alice..erin configured."""
    gw = GatewayProc(tmp_path_factory.mktemp("gw"), keys)
    gw.start()
    yield gw
    gw.teardown(docker_client, 200)


@pytest.fixture
def make_gateway(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path],
                 docker_client: docker.DockerClient) -> Iterator:
    """Factory for a private gateway (own prefix) when a test needs special settings."""
    made: list[GatewayProc] = []

    def make(**settings: object) -> GatewayProc:
        gw = GatewayProc(tmp_path_factory.mktemp("gwx"), keys, **settings)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.teardown(docker_client)
