"""Sockets made inside a container's network namespace, from the gateway itself.

`ssh -L localhost:8000` must reach a server bound to 127.0.0.1 *in her container* (VS Code's
and JetBrains' remote servers, Jupyter, dev servers and databases all default to that), which
no address dialled from the host can.  A socket belongs to the network namespace it was created
in, so one worker thread enters the container's namespace (setns applies to the calling thread
only), creates the socket, and comes back; the event loop then connects it as usual.  No process
per connection, no extra copy of the bytes.  The namespace is the container's own (its init's),
checked to belong to that container, so only her own loopback is ever reached.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
from concurrent.futures import ThreadPoolExecutor

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _belongs_to(pid: int, container_id: str) -> bool:
    """Whether `pid` is in the container's cgroup (v1 .../docker/<id>, v2 ...docker-<id>...)."""
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            return container_id in fh.read()
    except OSError:
        return False


class NamespaceSockets:
    """Creates sockets in other network namespaces on one dedicated worker thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgw-netns")
        self.available: bool | None = None  # None: not tried yet; False: not permitted here

    async def tcp_socket(self, pid: int, container_id: str) -> socket.socket:
        """A non-blocking TCP socket in the network namespace of `pid` (of that container)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._make, pid, container_id)

    def _make(self, pid: int, container_id: str) -> socket.socket:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # opened first, checked after: a PID reused meanwhile fails the check
            if not _belongs_to(pid, container_id):
                raise ProcessLookupError(f"pid {pid} is not in container {container_id[:12]}")
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                finally:
                    try:
                        _setns(own)
                    except OSError:  # never leave the worker in her namespace
                        self._pool.shutdown(wait=False)
                        self._pool = ThreadPoolExecutor(max_workers=1,
                                                        thread_name_prefix="dgw-netns")
                        raise
            finally:
                os.close(own)
        finally:
            os.close(target)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        self._pool.shutdown(wait=False)
