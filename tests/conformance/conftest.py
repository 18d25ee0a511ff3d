"""The conformance suite's gateway: in-process (port 0), parametrized by backend.

Every test in this directory runs once per backend: `fake` (local processes, seconds) and
`docker` (the real engine and DinD image, the default rootless profile).  The gateway runs in
a thread of the test process with its own event loop, so its log lines are captured by pytest
and shown only when a test fails; clients are the real OpenSSH tools and asyncssh.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import App
from gateway.config import load_gateway_config

from ..conftest import GatewayProc, pubkey, remove_labelled, unmount_under

BACKENDS = os.environ.get("DGW_CONFORMANCE_BACKENDS", "fake,docker").split(",")


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
    client = request.getfixturevalue("docker_client") if kind == "docker" else None
    gw = InProcessGateway(tmp_path_factory.mktemp(f"conf-{kind}"), keys, kind)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()
        if client is not None:
            remove_labelled(client, gw.prefix)
            unmount_under(gw.dir)
