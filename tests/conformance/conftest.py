"""The conformance suite's gateway: in-process (port 0), parametrized by backend.

Every test in this directory runs once per backend: `fake` (local processes, seconds),
`docker` (the real engine and DinD image, the default rootless profile) and `kubernetes` (a
real one-node cluster started once per session by scripts/k8s-cluster.sh, privileged pods).
The gateway runs in a thread of the test process with its own event loop, so its log lines are
captured by pytest and shown only when a test fails;
clients are the real OpenSSH tools and asyncssh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App
from gateway.config import load_gateway_config

from ..conftest import ROOT, GatewayProc, pubkey, remove_labelled, unmount_under

BACKENDS = os.environ.get("DGW_CONFORMANCE_BACKENDS", "fake,docker").split(",")
K8S_NODE = os.environ.get("DGW_K8S_NAME", "dgw-k8s-node")
K8S_HOST_PATH = "/var/lib/k8s/pv"  # on the node's volume (scripts/k8s-node.sh)


class Cluster:
    """The one-node cluster: its kubeconfig and kubectl inside the node."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def kubectl(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["docker", "exec", K8S_NODE, "/k8s/bin/kubectl", "--kubeconfig",
                            "/var/lib/k8s/admin.kubeconfig", *args], capture_output=True,
                           text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr}")
        return r.stdout


def _node_running() -> bool:
    r = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", K8S_NODE],
                       capture_output=True, text=True)
    return r.stdout.strip() == "true"


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[Cluster]:
    """A cluster up for the whole session: reused when one is running (CI starts it before
    pytest to print its durations), else started here and removed at the end.  A cluster
    that cannot start fails the tests: it is never a reason to skip."""
    script = ["bash", str(ROOT / "scripts" / "k8s-cluster.sh")]
    kubeconfig = Path(os.environ.get("DGW_K8S_CACHE", "/var/cache/dgw-k8s")) / \
        f"{K8S_NODE}.kubeconfig"
    kubeconfig = Path(os.environ.get("DGW_K8S_KUBECONFIG", kubeconfig))
    ours = not (_node_running() and kubeconfig.exists())
    if ours:
        t0 = time.monotonic()
        r = subprocess.run([*script, "up"], capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            pytest.fail(f"the Kubernetes cluster did not start ({time.monotonic() - t0:.0f} s):"
                        f"\n{r.stderr[-4000:]}", pytrace=False)
        kubeconfig = Path(r.stdout.strip().splitlines()[-1])
    try:
        yield Cluster(kubeconfig)
    finally:
        if ours:
            subprocess.run([*script, "down"], capture_output=True, timeout=300)


def on_cluster(gw: GatewayProc, cluster: Cluster) -> None:
    """Point a gateway at the cluster, in a namespace of its own (named by its prefix)."""
    gw.settings["kubernetes"] = {"kubeconfig": str(cluster.kubeconfig),
                                 "namespace": gw.prefix, "host_path": K8S_HOST_PATH,
                                 "image_pull_policy": "Never", "home_size": "1g",
                                 "docker_size": "2g"}
    cluster.kubectl("create", "namespace", gw.prefix)


@contextlib.contextmanager
def backend_for(request: pytest.FixtureRequest, kind: str,
                make: Callable[[dict[str, object]], InProcessGateway]
                ) -> Iterator[InProcessGateway]:
    """A started gateway of `kind`, and afterwards everything it made removed."""
    client = request.getfixturevalue("docker_client") if kind == "docker" else None
    cluster: Cluster | None = None
    extra: dict[str, object] = {}
    if kind == "kubernetes":
        cluster = request.getfixturevalue("k8s_cluster")
        extra = {"security_profile": "privileged"}
    gw = make(extra)
    if cluster is not None:
        on_cluster(gw, cluster)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        if client is not None:
            remove_labelled(client, gw.prefix)
            unmount_under(gw.dir)
        if cluster is not None:
            cluster.kubectl("delete", "namespace", gw.prefix, "--wait=false", check=False)
            cluster.kubectl("delete", "pv", "-l", f"dind-gateway.instance={gw.prefix}",
                            "--wait=false", check=False)


class InProcessGateway(GatewayProc):
    """A gateway App on port 0 in a thread; same client helpers as GatewayProc."""

    def __init__(self, workdir: Path, keys: dict[str, Path], backend: str,
                 **settings: object) -> None:
        super().__init__(workdir, keys, backend=backend, **settings)
        self.kind = backend
        self.settings["listen"] = "127.0.0.1:0"
        self.app: App | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    def default_users(self) -> dict[str, dict]:
        """alice..erin as everywhere, plus frank: a key without agent forwarding that may
        listen (-R) on port 7000 only."""
        users = super().default_users()
        users["frank"] = {"keys": [f'no-agent-forwarding,permitlisten="7000" '
                                   f'{pubkey(self.keys["alice2"])}']}
        users["grace"] = {"keys": [pubkey(self.keys["alice2"])], "record": True}
        return users

    def start(self, timeout: float = 30) -> None:
        import yaml

        self.config.write_text(yaml.safe_dump(self.settings, sort_keys=False))
        if not self.users_file.exists():
            self.write_users(self.default_users())
        config = load_gateway_config(self.config)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self.app = App(config)
                self._loop.run_until_complete(self.app.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                failure.append(exc)
                ready.set()
                return
            self.port = self.app.port
            ready.set()
            self._loop.run_until_complete(self.app.serve_forever())

        self._thread = threading.Thread(target=run, name=f"gateway-{self.kind}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("gateway did not start")
        if failure:
            raise failure[0]

    def call(self, make: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 120) -> Any:
        """Run a coroutine on the gateway's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(timeout)

    def soon(self, fn: Callable[[], object]) -> None:
        """Run a plain callable on the gateway's loop (asyncio objects are not thread-safe)."""
        self._loop.call_soon_threadsafe(fn)

    def stop(self, sig: int = 15) -> None:
        if self.app is not None and self._thread is not None and self._thread.is_alive():
            self.call(self.app.close, timeout=30)
            self._thread.join(30)

    def container_name(self, user: str) -> str:
        return f"{self.prefix}-{user}"


@pytest.fixture(scope="module", params=BACKENDS)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         keys: dict[str, Path]) -> Iterator[InProcessGateway]:
    """One in-process gateway per backend, shared by a module's tests."""
    kind = request.param
    with backend_for(request, kind, lambda extra: InProcessGateway(
            tmp_path_factory.mktemp(f"conf-{kind}"), keys, kind, **extra)) as gw:
        yield gw
