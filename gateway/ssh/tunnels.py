"""Channels that start inside her environment: `ssh -R` listeners and the forwarded agent.

Both listen *in her environment* (the backend makes the listening socket: in her container's
network namespace for `-R`, a socket file in her container for the agent), never on the
gateway host, where anything running as the gateway's user could use them.  Each accepted
connection becomes one SSH channel back to the client, and bytes are spliced both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import asyncssh

from ..backend import UnixListener

log = logging.getLogger("dind_gateway.tunnels")

_CHUNK = 256 * 1024


async def splice(a: tuple[Any, Any], b: tuple[Any, Any]) -> None:
    """Copy a → b and b → a until both directions ended; half-closes are passed on."""
    async def pump(reader: Any, writer: Any) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, asyncssh.Error, asyncio.IncompleteReadError):
            pass

    try:
        await asyncio.gather(pump(a[0], b[1]), pump(b[0], a[1]))
    finally:
        for writer in (a[1], b[1]):
            with contextlib.suppress(Exception):
                writer.close()


class RemoteForward(asyncssh.SSHListener):
    """`ssh -R port:…`: a listening socket in her environment; each connection is sent back
    to the client as a forwarded-tcpip channel."""

    def __init__(self, conn: asyncssh.SSHServerConnection, sock: socket.socket,
                 listen_host: str, on_close: Any = None) -> None:
        super().__init__()
        self._conn = conn
        self._sock = sock
        self._host = listen_host
        self._port = sock.getsockname()[1]
        self._server: asyncio.AbstractServer | None = None
        self._on_close = on_close

    async def start(self) -> RemoteForward:
        self._server = await asyncio.start_server(self._accepted, sock=self._sock)
        return self

    def get_port(self) -> int:
        return self._port

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            upstream = await self._conn.open_connection(self._host, self._port, peer[0],
                                                        peer[1])
        except (asyncssh.Error, OSError) as exc:
            log.info("remote forward %s:%s: client refused: %s", self._host, self._port, exc)
            writer.close()
            return
        await splice((reader, writer), upstream)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None
        self._sock.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()


class AgentRelay:
    """The client's ssh-agent as a socket file in her environment, for one connection."""

    def __init__(self, conn: asyncssh.SSHServerConnection, listener: UnixListener) -> None:
        self._conn = conn
        self._listener = listener
        self._server: asyncio.AbstractServer | None = None

    @property
    def path(self) -> str:
        """SSH_AUTH_SOCK for her sessions."""
        return self._listener.path

    async def start(self) -> AgentRelay:
        self._server = await asyncio.start_unix_server(self._accepted, sock=self._listener.sock)
        return self

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        # asyncssh's open_agent_connection() insists on its own (host-side) listener, so the
        # agent channel is opened directly; agent messages are small, one bridge each way
        chan = self._conn.create_agent_channel()
        try:
            await chan.open(lambda: _ToSocket(writer))
        except (asyncssh.Error, OSError) as exc:
            log.info("agent connection refused by the client: %s", exc)
            writer.close()
            return
        try:
            while data := await reader.read(_CHUNK):
                chan.write(data)
            chan.write_eof()
        except (OSError, asyncssh.Error):
            chan.close()


class _ToSocket(asyncssh.SSHUNIXSession[bytes]):
    """Agent channel → her socket."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._writer.write(data)

    def eof_received(self) -> bool:
        if self._writer.can_write_eof():
            self._writer.write_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._listener.cleanup()
