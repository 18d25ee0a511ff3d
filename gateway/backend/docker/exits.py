"""How her session's process ended: by exit or by signal, as sshd tells the client.

`runc exec` (like the engine's exec API) reports a process killed by signal N as exit status
128+N, the same number `exit 143` gives, so the client would see `exit-status 143` where sshd
sends `exit-signal TERM` (and OpenSSH's `ssh` exits 255).  The kernel's process-events
connector (netlink, NETLINK_CONNECTOR / CN_IDX_PROC) reports every exit on the host with the
raw wait status and the parent's pid.  Her process's parent is the `runc exec` the gateway
started (runc is a subreaper; what her process leaves behind is reparented to her container's
init, inside its pid namespace), and the event is queued before the parent can reap it: so once
runc has exited, the last exit of a child of that runc in our socket is hers.

Nothing runs in her container for this.  It needs root in the host's initial user, pid and
network namespaces (a gateway in a container needs `pid: host` and `network_mode: host`, as
compose.yaml has); without them `open` returns None and signals stay 128+N.  Kernels from 6.6
filter events for us (non-zero exits only); older ones send all, and the ones we do not watch
are dropped as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct

log = logging.getLogger("dind_gateway.backend")

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXIT = 0x80000000
PROC_EVENT_NONZERO_EXIT = 0x20000000  # the filter of kernels >= 6.6
NLMSG_DONE = 3
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp
_EXIT = struct.Struct("=IIIIII")  # pid, tgid, exit_code (wait status), signal, ppid, ptgid
_HEAD = _NLMSG.size + _CN_MSG.size


class ExitWatch:
    """Raw wait statuses of the children of the runc processes being watched."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._watched: dict[int, int | None] = {}  # runc pid -> last child exit status seen
        self._reading = False

    @classmethod
    def open(cls) -> ExitWatch | None:
        """Listening and proven: a child of ours exiting non-zero was seen.  None (logged)
        when this host or this gateway cannot have the events."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            log.info("exit signals: reported as 128+N (no process-events connector: %s)", exc)
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE: root's own size
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        watch = cls(sock)
        try:
            sock.bind((0, CN_IDX_PROC))
            sock.setblocking(False)
            # the filtered form first; a kernel before 6.6 ignores a message of that length
            for op in (struct.pack("=II", PROC_CN_MCAST_LISTEN, PROC_EVENT_NONZERO_EXIT),
                       struct.pack("=I", PROC_CN_MCAST_LISTEN)):
                watch._send(op)
                if watch._proven():
                    return watch
            reason = "no events arrive (not in the host's namespaces, or not root?)"
        except OSError as exc:
            reason = str(exc)
        sock.close()
        log.info("exit signals: reported as 128+N (process-events connector: %s)", reason)
        return None

    def _send(self, op: bytes) -> None:
        cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
        self._sock.send(_NLMSG.pack(_NLMSG.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn)

    def _proven(self) -> bool:
        """A child that exits 1: its event is queued before we can reap it, so it is in the
        socket by the time waitpid returns."""
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 1"], {})
        self._watched[os.getpid()] = None
        try:
            os.waitpid(pid, 0)
            self._drain()
            return self._watched[os.getpid()] == 1 << 8
        finally:
            self._watched.pop(os.getpid(), None)

    def watch(self, runc_pid: int) -> None:
        """Start keeping what the children of this runc die of (call right after spawning
        it: before the event loop runs again, so no event of it is read unseen)."""
        self._watched[runc_pid] = None
        if not self._reading:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._drain)
            self._reading = True

    def take(self, runc_pid: int) -> int | None:
        """Once runc has exited: the wait status of its last child to exit (hers), if seen."""
        self._drain()
        return self._watched.pop(runc_pid, None)

    def _drain(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # the kernel dropped events: what we kept may not be the last; forget it
                log.warning("exit signals: events lost (host busy); some signals reported "
                            "as 128+N")
                for pid in self._watched:
                    self._watched[pid] = None
                continue
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        off = 0
        while off + _HEAD + _EVENT.size + _EXIT.size <= len(data):
            length = _NLMSG.unpack_from(data, off)[0]
            event = off + _HEAD
            if _EVENT.unpack_from(data, event)[0] == PROC_EVENT_EXIT:
                pid, tgid, status, _, _, parent = _EXIT.unpack_from(data, event + _EVENT.size)
                if pid == tgid and parent in self._watched:
                    self._watched[parent] = status
            off += max((length + 3) & ~3, 1)

    def close(self) -> None:
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._reading = False
        self._sock.close()
