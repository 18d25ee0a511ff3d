"""Sockets into her container made from the gateway itself: no process per connection.

TCP: sockets made inside the container's network namespace.

`ssh -L localhost:8000` must reach a server bound to 127.0.0.1 *in her container* (VS Code's
and JetBrains' remote servers, Jupyter, dev servers and databases all default to that), which
no address dialled from the host can.  A socket belongs to the network namespace it was created
in, so one worker thread enters the container's namespace (setns applies to the calling thread
only), creates the socket, and comes back; the event loop then connects it as usual.  No process
per connection, no extra copy of the bytes.  The namespace is the container's own (its init's),
checked to belong to that container, so only her own loopback is ever reached.

Unix sockets (the forwarded agent, `ssh -L` to a socket path): made or opened through
/proc/<pid>/root of her container, every path looked up inside her root by hand
(`resolve_in_root`) or below directories only root can write, so no link of hers can point
the gateway (root) at a socket of the host or of another user.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import secrets
import socket
import stat
from concurrent.futures import ThreadPoolExecutor

from ...errors import os_reason
from ..base import BackendError, SocketListener

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


_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def bind_listen(sock: socket.socket, port: int) -> socket.socket:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise BackendError(f"cannot listen on port {port}: {os_reason(exc)}",
                           f"listen 127.0.0.1:{port}: {exc}", "listen-failed") from exc
    return sock


def unix_listener(pid: int, container_id: str, user: str, name: str) -> SocketListener:
    """See DockerBackend.listen_unix; runs in a worker thread (blocking file calls)."""
    fds: list[int] = []

    def opendir(parent: int | None, path: str, flags: int = _DIR) -> int:
        fd = os.open(path, flags, dir_fd=parent)
        fds.append(fd)
        return fd

    try:
        # her root through the magic link (followed on purpose), then nothing else followed
        root = opendir(None, f"/proc/{pid}/root", _DIR & ~os.O_NOFOLLOW)
        with open(f"/proc/{pid}/cgroup") as fh:  # the PID is still that container's
            if container_id not in fh.read():
                raise ProcessLookupError(f"pid {pid} is not in container {container_id[:12]}")
        home = os.stat(opendir(opendir(root, "home"), user))  # her uid/gid, whatever they are
        run = opendir(root, "run")
        st = os.stat(run)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise PermissionError("/run in the container is writable by others")
        with contextlib.suppress(FileExistsError):
            os.mkdir("dgw", 0o755, dir_fd=run)
        base = opendir(run, "dgw")
        st = os.stat(base)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise PermissionError("/run/dgw in the container is not root's")
        token = secrets.token_hex(8)
        os.mkdir(token, 0o700, dir_fd=base)
        mine = opendir(base, token)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(f"/proc/self/fd/{mine}/{name}")
        # the socket's own mode follows the umask; the 0700 directory is what keeps others out
        os.chown(name, home.st_uid, home.st_gid, dir_fd=mine, follow_symlinks=False)
        os.chown(token, home.st_uid, home.st_gid, dir_fd=base, follow_symlinks=False)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    keep = (base, mine)
    for fd in fds:
        if fd not in keep:
            os.close(fd)

    def cleanup() -> None:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=mine)
        with contextlib.suppress(OSError):
            os.rmdir(token, dir_fd=base)
        os.close(mine)
        os.close(base)

    return SocketListener(sock, f"/run/dgw/{token}/{name}", cleanup)


def resolve_in_root(root: int, path: str) -> int:
    """An O_PATH fd of `path` looked up inside the directory `root` as if it were `/`: every
    symlink resolved by hand (absolute ones from `root`, `..` never above it), so nothing in
    her container can point outside it.  The last component is not followed."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    parts = [p for p in path.split("/") if p and p != "."]
    stack = [os.dup(root)]
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                target = os.readlink(name, dir_fd=stack[-1])
                os.close(fd)
                links += 1
                if links > 40:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            if not parts:
                return fd
            if not stat.S_ISDIR(mode):
                os.close(fd)
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
            stack.append(fd)
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    finally:
        for fd in stack:
            os.close(fd)


def unix_connect(pid: int, container_id: str, user: str, path: str) -> socket.socket:
    """See DockerBackend.open_unix; runs in a worker thread."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            if container_id not in fh.read():
                raise ProcessLookupError(f"pid {pid} is not in container {container_id[:12]}")
        home = resolve_in_root(root, f"/home/{user}")
        try:
            owner = os.fstat(home).st_uid
        finally:
            os.close(home)
        fd = resolve_in_root(root, path)
    finally:
        os.close(root)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.ENOTSOCK, "not a socket", path)
        if st.st_uid != owner:
            raise PermissionError(errno.EACCES, "not your socket", path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(f"/proc/self/fd/{fd}")  # the very inode checked above
        except OSError:
            sock.close()
            raise
    finally:
        os.close(fd)
    sock.setblocking(False)
    return sock
