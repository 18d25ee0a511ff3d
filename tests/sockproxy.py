"""A unix-socket forwarder for the engine-fault tests: the gateway's `docker_host` points at
its socket, which forwards to the real engine's socket while it is up.

`stop()` closes the listening socket, removes its file and cuts every forwarded connection
(both ways), so the gateway sees what it would see if the engine went away: connections
broken mid-stream and then nothing listening.  `start()` makes it reachable again.  This
simulates an engine outage by cutting its socket; the engine itself keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

_CHUNK = 256 * 1024


class SocketProxy:
    """Forward `path` to `target` (both unix sockets) from an event loop in a thread."""

    def __init__(self, path: Path, target: str = "/var/run/docker.sock") -> None:
        self.path = path
        self.target = target
        self.connections = 0  # accepted since creation, for assertion messages
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        if self._server is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._server = await asyncio.start_unix_server(self._accept, os.fspath(self.path))

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()  # a cut, not a polite close: the peer sees a reset
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # half-close: an exec's stdin EOF must pass through
        except (ConnectionError, OSError):
            writer.transport.abort()
