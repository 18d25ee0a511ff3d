"""Small asyncio helpers: fire-and-forget tasks, non-blocking fd writes.

Fire-and-forget tasks that cannot be garbage-collected half way:

The event loop keeps only weak references to tasks; one nobody holds may vanish mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[Any]] = set()


def background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Start coro as a task that stays referenced until it finishes."""
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


class FdWriter:
    """Non-blocking writes to a pipe or a pty master, with a buffer, `drain` and `close`.

    Not `loop.connect_write_pipe`: uvloop watches a write pipe for reading too (to notice its
    peer closing) and throws away what it reads, which on a pty master is the terminal's
    output.  The fd is ours: `close` closes it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._watching = False
        self._drained = asyncio.Event()
        self._drained.set()
        self.closed = False
        self._eof = False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if not self._buf:
            try:
                done = os.write(self._fd, data)
            except BlockingIOError:
                done = 0
            except OSError:  # the reader is gone: as a socket would, drop it
                self.close()
                return
            data = data[done:]
            if not data:
                return
        self._buf += data
        self._drained.clear()
        if not self._watching:
            asyncio.get_running_loop().add_writer(self._fd, self._flush)
            self._watching = True

    def _flush(self) -> None:
        try:
            done = os.write(self._fd, self._buf)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self._buf[:done]
        if not self._buf:
            self._stop_watching()
            self._drained.set()
            if self._eof:
                self.close()

    def write_eof(self) -> None:
        """Close once everything written has gone: the reader then sees end of file."""
        self._eof = True
        if not self._buf:
            self.close()

    def _stop_watching(self) -> None:
        if self._watching:
            asyncio.get_running_loop().remove_writer(self._fd)
            self._watching = False

    def buffered(self) -> int:
        return len(self._buf)

    async def drain(self) -> None:
        await self._drained.wait()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_watching()
        self._buf.clear()
        self._drained.set()
        with contextlib.suppress(OSError):
            os.close(self._fd)
