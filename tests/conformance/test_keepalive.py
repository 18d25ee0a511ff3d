"""A client gone from the network (no FIN, no RST) is dropped after interval x count."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import wait_for
from .conftest import BACKENDS, InProcessGateway, backend_for


class FreezingProxy:
    """A loopback TCP relay that can stop relaying while keeping both sockets open."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.frozen.is_set():
                continue  # the path is dead: bytes vanish, nobody is told
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture(scope="module", params=BACKENDS)
def alive_gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             keys: dict[str, Path]) -> Iterator[InProcessGateway]:
    with backend_for(request, request.param, lambda extra: InProcessGateway(
            tmp_path_factory.mktemp("alive"), keys, request.param, client_alive_interval="1s",
            client_alive_count_max=2, **extra)) as gw:
        yield gw


def test_vanished_client_is_dropped(alive_gw: InProcessGateway) -> None:
    gw = alive_gw
    proxy = FreezingProxy(gw.port)
    args = gw.ssh_args("bob")
    args[args.index("-p") + 1] = str(proxy.port)
    # the client itself sends no keepalives, as a laptop that lost its network would not
    client = subprocess.Popen(args + ["echo up; exec sleep 600"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    audit = gw.dir / "state" / "audit.log"

    def closes() -> list[dict]:
        return [e for e in map(json.loads, audit.read_text().splitlines())
                if e["event"] == "connection.close" and e.get("user") == "bob"]

    try:
        assert client.stdout.readline().strip() == b"up"
        before = len(closes())
        proxy.frozen.set()
        # interval 1 s x count 2: dropped in a few seconds, long before TCP would notice
        assert wait_for(lambda: len(closes()) > before, 30), gw.tail()
        assert wait_for(lambda: gw.app.registry.activity.connections.get("bob", 0) == 0, 10)
    finally:
        client.kill()
        client.wait(10)
        proxy.close()
