"""quickack.py: while a connection logs in, every read sets TCP_QUICKACK first and reaches the
connection unchanged; after HANDSHAKE_READS the connection's own protocol is back.  Over a
real loopback TCP connection, on stock asyncio and on uvloop (whose transports are not
asyncio.Transport subclasses).  What it buys, the 40 ms stalls gone, is measured by the bench
(docs/benchmarks.md), not here."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from gateway.ssh import quickack


class Conn(asyncio.Protocol):
    """The connection's own protocol: records what reaches it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reads: list[bytes] = []
        self.eof = False
        self.lost = asyncio.get_running_loop().create_future()
        self.read_event = asyncio.Event()
        self.made = asyncio.Event()
        self.eof_event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        quickack.install(transport)
        self.made.set()

    def data_received(self, data: bytes) -> None:
        self.reads.append(data)
        self.read_event.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.eof_event.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def _exchange() -> None:
    loop = asyncio.get_running_loop()
    made: list[Conn] = []
    accepted = asyncio.Queue()

    def factory() -> Conn:
        made.append(Conn())
        accepted.put_nowait(made[-1])
        return made[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = await asyncio.wait_for(accepted.get(), 5)
        await asyncio.wait_for(conn.made.wait(), 5)
        assert isinstance(conn.transport.get_protocol(), quickack.QuickAck)
        sent = [f"message {i}\n".encode() for i in range(quickack.HANDSHAKE_READS + 5)]
        for i, msg in enumerate(sent):
            conn.read_event.clear()
            writer.write(msg)
            await writer.drain()
            await asyncio.wait_for(conn.read_event.wait(), 5)  # one read each
            wrapped = isinstance(conn.transport.get_protocol(), quickack.QuickAck)
            assert wrapped == (i + 1 < quickack.HANDSHAKE_READS), (i, wrapped)
        assert b"".join(conn.reads) == b"".join(sent)
        assert conn.transport.get_protocol() is conn
        # a second connection ends while still wrapped: its end reaches the connection too
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"hello")
        w2.write_eof()
        second = await asyncio.wait_for(accepted.get(), 5)
        await asyncio.wait_for(second.eof_event.wait(), 5)
        w2.close()
        assert await asyncio.wait_for(second.lost, 5) is None
        assert second.reads == [b"hello"]
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_reads_pass_through_then_the_connection_has_its_transport_back(loop: str) -> None:
    if loop == "uvloop":
        uvloop.run(_exchange())
    else:
        asyncio.run(_exchange())


def test_each_handshake_read_asks_for_an_immediate_ack() -> None:
    calls: list[tuple[int, int, int]] = []
    reads: list[bytes] = []

    class Sock:
        family = socket.AF_INET

        def setsockopt(self, level: int, name: int, value: int) -> None:
            calls.append((level, name, value))

    class Inner(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            # the ACK was asked for before the connection saw the bytes
            reads.append(data)
            assert len(calls) == len(reads)

    class Transport:
        def __init__(self) -> None:
            self.protocol: asyncio.BaseProtocol = Inner()

        def get_extra_info(self, name: str) -> object:
            return Sock() if name == "socket" else None

        def get_protocol(self) -> asyncio.BaseProtocol:
            return self.protocol

        def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
            self.protocol = protocol

    t = Transport()
    quickack.install(t)
    for i in range(quickack.HANDSHAKE_READS):
        t.protocol.data_received(b"%d" % i)
    assert calls == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)] * quickack.HANDSHAKE_READS
    assert isinstance(t.protocol, Inner)  # stepped aside: later reads cost nothing extra
