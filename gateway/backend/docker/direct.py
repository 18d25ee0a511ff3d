"""The direct process path: `runc exec` next to the engine, bytes straight to the gateway.

A `docker exec` relays every byte twice in user space (containerd-shim's FIFOs, then dockerd,
which frames it onto the hijacked HTTP connection the gateway parses).  When the gateway runs
on the engine's host as root, it can instead ask runc itself to start the session's process
in her container, against the engine's own state of it (`runc --root /run/docker/runtime-runc/
moby exec <id>`): runc applies exactly what it applies for the engine's execs — the
container's namespaces, cgroup, capability sets, seccomp filter, AppArmor profile,
no_new_privs and rlimits from its config — and the user the gateway names (her uid, gid and
the container's extra groups, resolved as the engine does).

runc runs *detached* (`exec -d`) and is gone once her process runs: the gateway is a child
subreaper, so her process (runc's child) becomes the gateway's own, as containerd-shim is for
the engine's execs.  Nothing stays resident per session, and her process's wait status is
the gateway's to read: a signal that killed it is told apart from `exit 128+N` (sshd's
`exit-signal`).  A non-terminal process gets the gateway's pipes as fds 3, 4, 5
(`--preserve-fds`), which a one-line `sh` moves onto 0, 1, 2; runc's stderr is kept for its
own errors.  A terminal is made by runc in her container and its master handed to the gateway
over a console socket (`--console-socket`): the gateway reads and writes her terminal itself,
as sshd does its pty, with no copy in between; resizing it is an ioctl, closing it the hang-up.

What else becomes the gateway's child that way (an orphan of a runc that died half-way) is
reaped by a sweep (`DirectExec.sweep`).  The engine API stays the fallback (a remote engine, a
gateway in a container without the host's /run and runc, `process_path: engine`) and the
model for the Kubernetes backend.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import re
import shutil
import signal as signals
import socket
import struct
import tempfile
import termios
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...aio import FdWriter, background
from ..base import BackendError
from .process import HANGUP_GRACE, SIGNALS

log = logging.getLogger("dind_gateway.backend")

RUNC_ROOT = "/run/docker/runtime-runc/moby"  # where dockerd's containerd shim keeps runc state
# fds 3, 4, 5 become stdin, stdout, stderr; `exec "$@"` keeps pid, exit status and signals
REDIRECT = ["/bin/sh", "-c", 'exec 0<&3 1>&4 2>&5 3<&- 4>&- 5>&-; exec "$@"', "sh"]
SPEC_FD = 9  # runc reads the process spec from /proc/self/fd/9
PR_SET_CHILD_SUBREAPER = 36
_START_TIMEOUT = 60.0  # runc exec -d: from spawn to her process running
_READ = 256 * 1024
_HIGH_WATER = 1 << 20  # bytes read but not yet taken before reading pauses


@dataclass(frozen=True)
class Identity:
    """Who her session runs as: what Docker resolves for `docker exec -u NAME`."""

    uid: int
    gid: int
    groups: tuple[int, ...]


class DirectExec:
    """Starts processes in the engine's containers through runc (see the module docstring)."""

    def __init__(self, runc: str, root: str = RUNC_ROOT) -> None:
        self.runc = runc
        self.root = root
        # runc's pid files and console sockets: a directory of ours, root's alone
        self.scratch = tempfile.mkdtemp(prefix="dgw-runc-", dir="/run" if os.access(
            "/run", os.W_OK) else None)
        self.sessions: set[int] = set()  # pids of her processes we wait for
        self._zombies: set[int] = set()  # children seen dead and unclaimed at the last sweep
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def probe(cls, root: str = RUNC_ROOT) -> DirectExec | None:
        """Usable here: root, a runc binary, the engine's runc state on this host, and the
        gateway made a child subreaper (so her processes become its children)."""
        runc = shutil.which("runc")
        if os.geteuid() != 0 or runc is None or not os.path.isdir(root):
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("direct path off: prctl(PR_SET_CHILD_SUBREAPER): %s",
                        os.strerror(ctypes.get_errno()))
            return None
        return cls(runc, root)

    def knows(self, container_id: str) -> bool:
        """The engine's container is one runc here manages (not a remote engine's)."""
        return bool(container_id) and os.path.isfile(
            os.path.join(self.root, container_id, "state.json"))

    def base_process(self, container_id: str) -> dict[str, Any]:
        """The container's own OCI process (capabilities, AppArmor profile, no_new_privs,
        rlimits, environment), from the bundle the engine made: what a `docker exec` starts
        from.  Read once per container start by the backend."""
        state = json.loads(Path(self.root, container_id, "state.json").read_text())
        bundle = next(label.split("=", 1)[1] for label in state["config"]["labels"]
                      if label.startswith("bundle="))
        return json.loads(Path(bundle, "config.json").read_text())["process"]

    async def start(self, container_id: str, base: dict[str, Any], who: Identity,
                    argv: list[str], env: dict[str, str], workdir: str, tty: bool,
                    size: tuple[int, int] = (80, 24)) -> DirectProcess:
        """Her process, running (runc's own failures are reported by `DirectProcess.wait`).

        Its spec is the container's process with what `docker exec -u USER` replaces: the
        arguments, the environment (hers over the container's), the directory, the terminal
        and the user (uid, gid and exactly her groups: runc's --user would keep root's)."""
        spec = dict(base)
        spec["args"] = list(argv) if tty else [*REDIRECT, *argv]
        spec["env"] = _merge_env(base.get("env") or [], env)
        spec["cwd"] = workdir
        spec["terminal"] = tty
        spec["user"] = {"uid": who.uid, "gid": who.gid,
                        "additionalGids": list(dict.fromkeys((who.gid, *who.groups)))}
        spec.pop("consoleSize", None)
        if tty:
            spec["consoleSize"] = {"height": size[1], "width": size[0]}
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = background(self._sweep_forever())
        # the spec goes in a memfd as fd 9: no file to clean up, no size limit of a pipe
        memfd = os.memfd_create("dgw-process", os.MFD_CLOEXEC)
        name = os.path.join(self.scratch, os.urandom(6).hex())
        try:
            os.write(memfd, json.dumps(spec).encode())
            cmd = [self.runc, "--root", self.root, "exec", "-d", "--pid-file", name + ".pid",
                   "--process", f"/proc/self/fd/{SPEC_FD}"]
            if tty:
                return await self._start_tty(cmd, container_id, memfd, name)
            return await self._start_pipes(cmd, container_id, memfd, name)
        finally:
            os.close(memfd)

    async def _start_pipes(self, cmd: list[str], container_id: str, memfd: int,
                           name: str) -> DirectProcess:
        ends: list[int] = []
        try:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            log_r, log_w = os.pipe()
            ends = [in_r, in_w, out_r, out_w, err_r, err_w, log_r, log_w]
            # above 9 first, so that moving them onto 3, 4, 5 cannot overwrite one another
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (in_r, out_w, err_w)]
            ends += high
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            ends.append(null)
            actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                       (os.POSIX_SPAWN_DUP2, log_w, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
            actions.append((os.POSIX_SPAWN_DUP2, memfd, SPEC_FD))
            # posix_spawn is vfork + exec: it returns once runc is running, in well under 1 ms
            pid = os.posix_spawn(self.runc, [*cmd, "--preserve-fds", "3",  # noqa: ASYNC221
                                             container_id], _spawn_env(),
                                 file_actions=actions, setsigdef=_DEFAULT_SIGNALS)
            for fd in (in_r, out_w, err_w, log_w, null, *high):
                os.close(fd)
                ends.remove(fd)
            proc = DirectProcess(self, pid, name + ".pid", tty=False)
            await proc.attach(write_fd=in_w, read_fds=((1, out_r), (2, err_r)), log_fd=log_r)
            return proc
        except BaseException:
            for fd in ends:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    async def _start_tty(self, cmd: list[str], container_id: str, memfd: int,
                         name: str) -> DirectProcess:
        """runc makes her terminal in her container and hands us its master over a console
        socket; we wait for that, or for runc to end without it (it failed: wait() says why)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        log_r = log_w = -1
        try:
            listener.bind(name + ".sock")
            listener.listen(1)
            listener.setblocking(False)
            log_r, log_w = os.pipe()
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                pid = os.posix_spawn(  # noqa: ASYNC221 - vfork + exec, well under 1 ms
                    self.runc, [*cmd, "-t", "--console-socket", name + ".sock",
                                container_id], _spawn_env(), setsigdef=_DEFAULT_SIGNALS,
                    file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                                  (os.POSIX_SPAWN_DUP2, log_w, 2),
                                  (os.POSIX_SPAWN_DUP2, memfd, SPEC_FD)])
            finally:
                os.close(null)
                os.close(log_w)
                log_w = -1
            proc = DirectProcess(self, pid, name + ".pid", tty=True)
            master = await proc.console(listener)
        except BaseException:
            for fd in (log_r, log_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(name + ".sock")
        if master < 0:  # runc ended without a terminal for us: wait() reports its error
            await proc.attach(write_fd=-1, read_fds=(), log_fd=log_r)
            return proc
        proc._master = master
        await proc.attach(write_fd=os.dup(master), read_fds=((1, os.dup(master)),),
                          log_fd=log_r)
        return proc

    async def _sweep_forever(self, every: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep()

    def sweep(self) -> list[int]:
        """Reap children of ours that died unclaimed: dead at two sweeps in a row and none
        of her sessions (asyncio's and uvloop's own children are reaped at once, by pid).
        A runc that died before writing its pid file leaves her process to us that way."""
        me = str(os.getpid())
        dead = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z" and fields[1] == me and int(entry) not in self.sessions:
                dead.add(int(entry))
        reaped = []
        for pid in dead & self._zombies:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    reaped.append(pid)
        if reaped:
            log.info("reaped %d orphaned process(es) of runc: %s", len(reaped), reaped)
        self._zombies = dead - set(reaped)
        return reaped

    def close(self) -> None:
        """The backend is done.  Her processes still running are our children: reaped by a
        thread as they end, not left as zombies — a zombie of her container's pid namespace
        keeps the container from ever finishing its exit (the engine then cannot remove it:
        "did not receive an exit event")."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.sessions:
            threading.Thread(target=_reap_when_done, args=(sorted(self.sessions),),
                             name="dgw-reap", daemon=True).start()


def _merge_env(base: list[str], env: dict[str, str]) -> list[str]:
    """The container's variables, hers replacing any of the same name (as Docker's exec)."""
    merged = {item.split("=", 1)[0]: item for item in base}
    merged.update({k: f"{k}={v}" for k, v in env.items()})
    return list(merged.values())


_DEFAULT_SIGNALS = (signals.SIGPIPE, signals.SIGINT, signals.SIGTERM, signals.SIGHUP)


def _spawn_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}


class _Reader(asyncio.Protocol):
    """One output pipe (or the pty master) into the process's shared output queue."""

    def __init__(self, proc: DirectProcess, stream: int) -> None:
        self.proc, self.stream = proc, stream
        self.transport: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.proc._received(self, data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:  # EIO on a pty: its end
        self.proc._ended(self)


class DirectProcess:
    """`Process` over her process, started by a detached runc (see backend.base.Process).

    Two stages: runc running (it may still fail: its exit status and stderr say why), then
    her process, our child from then on (see the module docstring), until we reap it."""

    def __init__(self, direct: DirectExec, runc_pid: int, pidfile: str, *, tty: bool) -> None:
        loop = asyncio.get_running_loop()
        self.direct = direct
        self.runc_pid = runc_pid  # our child until we reap it
        self.pid: int | None = None  # hers (the host's number), once runc has started it
        self.tty = tty
        self.on_exit: Callable[[], object] | None = None
        # set by the backend: why her container went away (None: it did not), and how to
        # kill what her session left after a hang-up (as her, in her container)
        self.gone: Callable[[], Awaitable[BackendError | None]] | None = None
        self.kill_leftovers: Callable[[], Awaitable[None]] | None = None
        self.exit_signal: tuple[str, bool] | None = None  # (name, core dumped): see wait()
        self._pidfile = pidfile
        self._hung_up = False
        self._status: int | None = None
        self._exited = loop.create_future()
        self._runc_done = loop.create_future()
        self._pending: list[signals.Signals] = []  # signals before her process ran
        self._runc_fd = os.pidfd_open(runc_pid)
        loop.add_reader(self._runc_fd, self._runc_ended)
        self._her_fd = -1
        self._queue: deque[tuple[int, bytes]] = deque()
        self._queued = 0
        self._more = asyncio.Event()
        self._readers: list[_Reader] = []
        self._open = 0
        self._writer: FdWriter | None = None
        self._master = -1
        self._log = bytearray()
        self._log_done = asyncio.Event()

    # --- set-up -----------------------------------------------------------------------------

    async def console(self, listener: socket.socket) -> int:
        """The master of the terminal runc made for her, from the console socket; -1 if runc
        ended without sending one (it failed)."""
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        try:
            await asyncio.wait_for(asyncio.wait({accept, self._runc_done},
                                                return_when=asyncio.FIRST_COMPLETED),
                                   _START_TIMEOUT)
        except TimeoutError:
            accept.cancel()
            self.send(signals.SIGKILL)
            raise BackendError("your terminal could not be set up; try again",
                               f"runc exec -t: no console after {_START_TIMEOUT:.0f} s",
                               "exec-failed") from None
        if accept.done():
            conn, _ = accept.result()
        else:  # runc is gone: what it connected before it ended is queued in the backlog
            accept.cancel()
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return -1
        with conn:
            return await asyncio.wait_for(_receive_fd(conn), _START_TIMEOUT)

    async def attach(self, *, write_fd: int, read_fds: tuple[tuple[int, int], ...],
                     log_fd: int) -> None:
        loop = asyncio.get_running_loop()
        for stream, fd in read_fds:
            reader = _Reader(self, stream)
            self._readers.append(reader)
            self._open += 1
            await loop.connect_read_pipe(lambda r=reader: r, os.fdopen(fd, "rb", buffering=0))
        if write_fd >= 0:
            self._writer = FdWriter(write_fd)
        background(self._collect_log(log_fd))

    async def _collect_log(self, fd: int) -> None:
        """runc's own stderr: empty unless runc itself failed."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport = None
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
            while len(self._log) < 16384:
                data = await reader.read(4096)
                if not data:
                    break
                self._log += data
        finally:
            # uvloop keeps a read pipe open after EOF (StreamReaderProtocol asks it to): closed
            # here, not whenever the garbage collector gets to it (the soak run's fd sawtooth)
            if transport is not None:
                transport.close()
            self._log_done.set()

    # --- the two stages ---------------------------------------------------------------------

    def _runc_ended(self) -> None:
        """runc has started her process (and written its pid) or failed."""
        try:
            pid, status = os.waitpid(self.runc_pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.runc_pid, 255 << 8
        if pid == 0:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._runc_fd)
        os.close(self._runc_fd)
        self._runc_fd = -1
        code = os.waitstatus_to_exitcode(status)
        her = None
        if code == 0:
            with contextlib.suppress(OSError, ValueError):
                her = int(Path(self._pidfile).read_text())
        with contextlib.suppress(OSError):
            os.unlink(self._pidfile)
        self._runc_done.set_result(None)
        if her is None:  # runc failed: its status (and stderr, in wait) are the session's
            self._finish(code if code > 0 else 128 - code if code < 0 else 255)
            return
        # she is our child now (reparented to us, a subreaper, when runc exited): a zombie at
        # worst, so the number cannot be anyone else's until we reap it
        self.pid = her
        self.direct.sessions.add(her)
        self._her_fd = os.pidfd_open(her)
        loop.add_reader(self._her_fd, self._her_ended)
        for sig in self._pending:
            self.send(sig)
        self._pending.clear()
        self._her_ended()

    def _her_ended(self) -> None:
        try:
            info = os.waitid(os.P_PIDFD, self._her_fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:  # not ours after all (should not happen): no status
            info, status = None, 255
        else:
            if info is None:
                return
            status = info.si_status
        asyncio.get_running_loop().remove_reader(self._her_fd)
        os.close(self._her_fd)
        self._her_fd = -1
        self.direct.sessions.discard(self.pid or 0)
        if info is not None and info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
            # told apart from `exit 128+N`: the session sends exit-signal, as sshd does
            self.exit_signal = (signals.Signals(info.si_status).name[3:],
                                info.si_code == os.CLD_DUMPED)
            status = 128 + info.si_status
        self._finish(status)

    def _finish(self, status: int) -> None:
        self._status = status
        if not self._exited.done():
            self._exited.set_result(status)
        self._more.set()  # a terminal's output ends with her process (see read)

    # --- output -----------------------------------------------------------------------------

    def _received(self, reader: _Reader, data: bytes) -> None:
        self._queue.append((reader.stream, data))
        self._queued += len(data)
        self._more.set()
        if self._queued > _HIGH_WATER:
            for r in self._readers:
                if r.transport is not None and not r.transport.is_closing():
                    r.transport.pause_reading()

    def _ended(self, reader: _Reader) -> None:
        self._open -= 1
        self._more.set()

    async def read(self) -> tuple[int, bytes]:
        while not self._queue:
            if self._open <= 0 or (self.tty and self._status is not None):
                if self._master >= 0:
                    # her terminal: what it still holds (when she was its last user, the
                    # kernel has it all for us before it reports the end) — and when jobs of
                    # hers keep it open, her shell's end is the session's, as under sshd
                    await asyncio.shield(self._exited)
                    rest = _read_all(self._master)
                    if rest:
                        return 1, rest
                return 0, b""
            self._more.clear()
            await self._more.wait()
        stream, data = self._queue.popleft()
        self._queued -= len(data)
        if self._queued < _HIGH_WATER // 4:
            for r in self._readers:
                if r.transport is not None and not r.transport.is_closing():
                    r.transport.resume_reading()
        return stream, data

    # --- input ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._writer is not None:
            self._writer.write(data)

    def write_eof(self) -> None:
        """stdin ends (a pipe closes).  Never for a terminal: as with sshd, nothing happens."""
        if not self.tty and self._writer is not None:
            self._writer.write_eof()

    def buffered(self) -> int:
        return 0 if self._writer is None else self._writer.buffered()

    async def drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    # --- control ----------------------------------------------------------------------------

    async def resize(self, rows: int, cols: int) -> None:
        """Her terminal's size: the kernel tells her foreground job (SIGWINCH)."""
        if self._master >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, sig: signals.Signals) -> bool:
        """To her process (kept until runc has started it); False once it has exited."""
        if self._status is not None:
            return False
        if self._her_fd < 0:
            if sig == signals.SIGKILL and self._runc_fd >= 0:  # giving up on the start
                with contextlib.suppress(ProcessLookupError):
                    signals.pidfd_send_signal(self._runc_fd, sig)
            self._pending.append(sig)
            return True
        try:
            signals.pidfd_send_signal(self._her_fd, sig)
        except ProcessLookupError:
            return False
        return True

    @property
    def running(self) -> bool:
        return self._status is None

    async def signal(self, name: str) -> None:
        """The client's signal, to her process."""
        if name in SIGNALS:
            self.send(getattr(signals, f"SIG{name}"))

    async def wait(self) -> int:
        """Her process's exit status (128+N if signal N killed it; `exit_signal` then names
        N).  If runc could not start it, or a signal came with the end of her whole
        container, the reason as a BackendError."""
        status = await asyncio.shield(self._exited)
        await self._log_done.wait()
        failed = ""
        if status != 0 and self._log:  # her own stderr is elsewhere: this is runc's
            lines = [line for line in self._log.decode(errors="replace").splitlines()
                     if line.strip() and not re.search(r"level=(warning|info|debug)", line)]
            failed = "\n".join(lines)
        if (failed or status >= 128) and self.gone is not None:
            # killed: by her, or with her whole container (removed, stopped, OOM)?  The
            # kernel knows before the engine does: look again briefly.
            for pause in (0.0, 0.1, 0.2, 0.4):
                await asyncio.sleep(pause)
                gone = await self.gone()
                if gone is not None:
                    raise gone
        if "argument list too long" in failed.lower():  # her command: what a shell would say
            raise BackendError("sh: Argument list too long", f"runc exec: {failed[-300:]}",
                               "exec-failed")
        if failed:
            raise BackendError("your session could not be started in your container; try "
                               "again", f"runc exec: {failed[-500:]}", "exec-failed")
        if self.on_exit is not None:
            self.on_exit()
        return status

    def close(self) -> None:
        """Our side ends, as with sshd: the pipes close (her command's input ends) or her
        terminal's master does (the kernel hangs it up: her shell gets SIGHUP, and tells its
        jobs).  What is still running after HANGUP_GRACE is killed, its process group too;
        what she detached (setsid, nohup, tmux) lives on."""
        if self._writer is not None:
            self._writer.close()
        for r in self._readers:
            if r.transport is not None:
                r.transport.close()
        if self._master >= 0:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = -1
        if self._status is None and not self._hung_up:
            self._hung_up = True
            background(self._hang_up())

    async def _hang_up(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), HANGUP_GRACE)
        except TimeoutError:
            if self.kill_leftovers is not None:
                await self.kill_leftovers()
                log.info("killed the leftover session process (pid %s) after %.0f s",
                         self.pid, HANGUP_GRACE)


async def _receive_fd(conn: socket.socket) -> int:
    """The one fd runc sends over its console socket (SCM_RIGHTS), close-on-exec; -1 if the
    connection ends without one."""
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    size = array.array("i").itemsize
    while True:
        try:
            _, ancillary, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4 * size),
                                              socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _settle, readable)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())
            continue
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % size])
        for extra in fds[1:]:
            os.close(extra)
        return fds[0] if fds else -1


def _reap_when_done(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _read_all(fd: int) -> bytes:
    """What a pipe or pty holds now, without waiting (EIO, EAGAIN: nothing more)."""
    out = bytearray()
    with contextlib.suppress(OSError):
        os.set_blocking(fd, False)
        while True:
            chunk = os.read(fd, _READ)
            if not chunk:
                break
            out += chunk
    return bytes(out)
