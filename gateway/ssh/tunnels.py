"""Channels that start inside her environment: `ssh -R` listeners and the forwarded agent.

Both listen *in her environment* (the backend's `Listener`: a socket in her container's
network namespace for `-R`, a socket file in her container for the agent; on Kubernetes a
helper in her pod), never on the gateway host, where anything running as the gateway's user
could use them.  Each accepted connection becomes one SSH channel back to the client, and
bytes are spliced both ways.  Listeners end with the SSH connection that asked for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncssh

from ..aio import background
from ..backend import Listener
from ..errors import GatewayError

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


class _Accepting:
    """Runs `handle` for every connection `listener` accepts, until closed (or the listener
    ends on the platform's side)."""

    def __init__(self, listener: Listener, what: str) -> None:
        self._listener = listener
        self._what = what
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            try:
                sock, peer = await self._listener.accept()
            except (GatewayError, OSError) as exc:
                log.info("%s ended: %s", self._what, exc)
                return
            background(self._handle(sock, peer))

    async def _handle(self, sock: Any, peer: tuple[str, int]) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._listener.close()


class RemoteForward(_Accepting, asyncssh.SSHListener):
    """`ssh -R port:…`: a listener in her environment; each connection is sent back to the
    client as a forwarded-tcpip channel."""

    def __init__(self, conn: asyncssh.SSHServerConnection, listener: Listener,
                 listen_host: str, on_close: Any = None) -> None:
        asyncssh.SSHListener.__init__(self)
        _Accepting.__init__(self, listener, f"remote forward {listen_host}:{listener.port}")
        self._conn = conn
        self._host = listen_host
        self._port = listener.port
        self._on_close = on_close

    async def start(self) -> RemoteForward:
        self._start()
        return self

    def get_port(self) -> int:
        return self._port

    async def _handle(self, sock: Any, peer: tuple[str, int]) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            return
        try:
            upstream = await self._conn.open_connection(self._host, self._port, peer[0],
                                                        peer[1])
        except (asyncssh.Error, OSError) as exc:
            log.info("remote forward %s:%s: client refused: %s", self._host, self._port, exc)
            writer.close()
            return
        await splice((reader, writer), upstream)

    def close(self) -> None:
        self._stop()
        if self._on_close is not None:
            self._on_close(self)
            self._on_close = None

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class AgentRelay(_Accepting):
    """The client's ssh-agent as a socket file in her environment, for one connection."""

    def __init__(self, conn: asyncssh.SSHServerConnection, listener: Listener) -> None:
        super().__init__(listener, "agent relay")
        self._conn = conn

    @property
    def path(self) -> str:
        """SSH_AUTH_SOCK for her sessions."""
        return self._listener.path

    async def start(self) -> AgentRelay:
        self._start()
        return self

    async def _handle(self, sock: Any, peer: tuple[str, int]) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except OSError:
            sock.close()
            return
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

    def close(self) -> None:
        """Stops listening and removes the socket (the connection ended)."""
        self._stop()


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
