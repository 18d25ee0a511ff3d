"""The direct process path: `runc exec` next to the engine, bytes straight to the gateway.

A `docker exec` relays every byte twice in user space (containerd-shim's FIFOs, then dockerd,
which frames it onto the hijacked HTTP connection the gateway parses).  When the gateway runs
on the engine's host as root, it can instead ask runc itself to start the session's process
in her container, against the engine's own state of it (`runc --root /run/docker/runtime-runc/
moby exec <id>`): runc applies exactly what it applies for the engine's execs — the
container's namespaces, cgroup, capability sets, seccomp filter, AppArmor profile,
no_new_privs and rlimits from its config — and the user the gateway names (her uid, gid and
the container's extra groups, resolved as the engine does).

Her process's stdio are then the gateway's own pipe ends; runc stays as its parent only to
pass on signals and report the exit status, and nothing copies a byte.  A pty session is the
exception: runc's terminal in her container, which runc (attached: its console socket is for
detached runs only) copies to and from a pty pair of the gateway's.  A non-terminal process gets
the pipes as fds 3, 4, 5 (`--preserve-fds`) and a one-line `sh` moves them onto 0, 1, 2, so
runc's own stdio (its relay) carry nothing; runc's stderr is kept for its own errors.  A
terminal spare (spares.py) gets one preserved fd, 3: the pipe its header comes on.

The engine API stays the fallback (a remote engine, a gateway in a container without the host's
/run and runc, `process_path: engine`) and the model for the Kubernetes backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import pty
import re
import resource
import shutil
import signal as signals
import struct
import termios
import tty as ttys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...aio import FdWriter, background
from ..base import BackendError
from .exits import ExitWatch
from .process import HANGUP_GRACE, SIGNALS

log = logging.getLogger("dind_gateway.backend")

RUNC_ROOT = "/run/docker/runtime-runc/moby"  # where dockerd's containerd shim keeps runc state
# fds 3, 4, 5 become stdin, stdout, stderr; `exec "$@"` keeps pid, exit status and signals
REDIRECT = ["/bin/sh", "-c", 'exec 0<&3 1>&4 2>&5 3<&- 4>&- 5>&-; exec "$@"', "sh"]
SPEC_FD = 9  # runc reads the process spec from /proc/self/fd/9
_READ = 256 * 1024
PIPE_SIZE = 1 << 20  # her stdin and stdout pipes (the default pipe-max-size)
_HIGH_WATER = 1 << 20  # bytes read but not yet taken before reading pauses


@dataclass(frozen=True)
class Identity:
    """Who her session runs as: what Docker resolves for `docker exec -u NAME`."""

    uid: int
    gid: int
    groups: tuple[int, ...]


class DirectExec:
    """Starts processes in the engine's containers through runc (see the module docstring)."""

    def __init__(self, runc: str, root: str = RUNC_ROOT, exits: ExitWatch | None = None) -> None:
        self.runc = runc
        self.root = root
        self.exits = exits  # what her process died of (see exits.py); None: 128+N only

    @classmethod
    def probe(cls, root: str = RUNC_ROOT) -> DirectExec | None:
        """Usable here: root and a runc binary.  The engine's runc state need not exist yet
        (the engine makes its directory at its first container since boot, after a gateway
        started at boot): `knows` looks per container, and until runc knows hers a session
        goes through the engine's exec API."""
        runc = shutil.which("runc")
        if os.geteuid() != 0 or runc is None:
            return None
        return cls(runc, root, ExitWatch.open())

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
        process = json.loads(Path(bundle, "config.json").read_text())["process"]
        process["rlimits"] = engine_rlimits(state.get("init_process_pid"),
                                            process.get("rlimits") or [])
        return process

    async def start(self, container_id: str, base: dict[str, Any], who: Identity,
                    argv: list[str], env: dict[str, str], workdir: str, tty: bool,
                    size: tuple[int, int] = (80, 24), header: bool = False) -> DirectProcess:
        """Her process, running (runc's own failures are reported by `DirectProcess.wait`).

        Its spec is the container's process with what `docker exec -u USER` replaces: the
        arguments, the environment (hers over the container's), the directory, the terminal
        and the user (uid, gid and exactly her groups: runc's --user would keep root's).

        `header` (a terminal spare, spares.py): her process also gets the read end of a pipe
        as fd 3, for the one line `DirectProcess.begin` writes (her terminal cannot carry it:
        it echoes, and a canonical-mode line ends at 4096 bytes)."""
        spec = _spec(base, who, list(argv) if tty else [*REDIRECT, *argv], env, workdir, tty)
        if tty:
            spec["consoleSize"] = {"height": size[1], "width": size[0]}
        memfd = _spec_fd(spec)
        try:
            if tty:
                return await self._start_tty(self._cmd(), container_id, memfd, size, header)
            return await self._start_pipes(self._cmd(), container_id, memfd)
        finally:
            os.close(memfd)

    def _cmd(self) -> list[str]:
        return [self.runc, "--root", self.root, "exec", "--process", f"/proc/self/fd/{SPEC_FD}"]

    async def start_with_socket(self, container_id: str, base: dict[str, Any], who: Identity,
                                argv: list[str], sock_fd: int, stdin: bytes) -> DirectProcess:
        """A helper of the gateway's in her container (the session launcher, launcher.py),
        started as her sessions are, with `sock_fd` as its fd 3, `stdin` (< 64 KiB: one pipe
        buffer) then EOF on its stdin and nothing on its stdout; runc's stderr and its own are
        kept for the log."""
        memfd = _spec_fd(_spec(base, who, argv, {}, "/", False))
        ends: list[int] = []
        try:
            log_r, log_w = os.pipe()
            in_r, in_w = os.pipe()
            ends = [log_r, log_w, in_r, in_w]
            os.write(in_w, stdin)
            os.close(in_w)
            ends.remove(in_w)
            high = fcntl.fcntl(sock_fd, fcntl.F_DUPFD_CLOEXEC, 10)
            ends.append(high)
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            ends.append(null)
            actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                       (os.POSIX_SPAWN_DUP2, log_w, 2), (os.POSIX_SPAWN_DUP2, high, 3),
                       (os.POSIX_SPAWN_DUP2, memfd, SPEC_FD)]
            pid = self._spawn([*self._cmd(), "--preserve-fds", "1", container_id], actions)
            for fd in (log_w, in_r, high, null):
                os.close(fd)
                ends.remove(fd)
            proc = DirectProcess(pid, tty=False, exits=None)
            await proc.attach(write_fd=-1, read_fds=(), log_fd=log_r)
            return proc
        except BaseException:
            _close_quietly(ends)
            raise
        finally:
            os.close(memfd)

    def _spawn(self, argv: list[str], actions: list[tuple[int, int, int]]) -> int:
        """runc, as posix_spawn (vfork + exec) starts it: back once it runs, well under 1 ms."""
        return os.posix_spawn(self.runc, argv, _spawn_env(), file_actions=actions,
                              setsigdef=_DEFAULT_SIGNALS)

    async def _start_pipes(self, cmd: list[str], container_id: str,
                           memfd: int) -> DirectProcess:
        ends: list[int] = []
        try:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            log_r, log_w = os.pipe()
            ends = [in_r, in_w, out_r, out_w, err_r, err_w, log_r, log_w]
            for fd in (in_w, out_w):
                grow_pipe(fd)
            # above 9 first, so that moving them onto 3, 4, 5 cannot overwrite one another
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (in_r, out_w, err_w)]
            ends += high
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            ends.append(null)
            actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                       (os.POSIX_SPAWN_DUP2, log_w, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(high)]
            actions.append((os.POSIX_SPAWN_DUP2, memfd, SPEC_FD))
            pid = self._spawn([*cmd, "--preserve-fds", "3", container_id], actions)
            for fd in (in_r, out_w, err_w, log_w, null, *high):
                os.close(fd)
                ends.remove(fd)
            proc = DirectProcess(pid, tty=False, exits=self.exits)
            await proc.attach(write_fd=in_w, read_fds=((1, out_r), (2, err_r)), log_fd=log_r)
            return proc
        except BaseException:
            _close_quietly(ends)
            raise

    async def _start_tty(self, cmd: list[str], container_id: str, memfd: int,
                         size: tuple[int, int], header: bool) -> DirectProcess:
        """runc makes her terminal in her container and, attached (`--console-socket` is for
        detached runs only), copies it to and from a pty pair of ours, whose size it follows
        on SIGWINCH."""
        master, slave = pty.openpty()
        log_r = log_w = head_r = head_w = -1
        try:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
            ttys.setraw(slave)  # ours only carries bytes: her terminal is the one that echoes
            log_r, log_w = os.pipe()
            actions = [(os.POSIX_SPAWN_DUP2, slave, 0), (os.POSIX_SPAWN_DUP2, slave, 1),
                       (os.POSIX_SPAWN_DUP2, log_w, 2), (os.POSIX_SPAWN_DUP2, memfd, SPEC_FD)]
            extra = []
            if header:  # above 9, then onto 3 (a pipe made now may be 3 to 9 itself)
                head_r, head_w = os.pipe()
                high = fcntl.fcntl(head_r, fcntl.F_DUPFD_CLOEXEC, 10)
                os.close(head_r)
                head_r = high
                actions.append((os.POSIX_SPAWN_DUP2, head_r, 3))
                extra = ["--preserve-fds", "1"]
            pid = os.posix_spawn(self.runc, [*cmd, *extra, container_id],  # noqa: ASYNC221
                                 _spawn_env(), setsid=True, setsigdef=_DEFAULT_SIGNALS,
                                 file_actions=actions)
        except BaseException:
            for fd in (master, log_r, head_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in (slave, log_w, head_r):
                if fd >= 0:
                    os.close(fd)
        proc = DirectProcess(pid, tty=True, exits=self.exits)
        proc._master = master
        if head_w >= 0:
            proc._header = FdWriter(head_w)
        await proc.attach(write_fd=os.dup(master), read_fds=((1, os.dup(master)),),
                          log_fd=log_r)
        return proc


_U64_MAX = (1 << 64) - 1
# the names runc knows (RLIMIT_OFILE is Python's alias of NOFILE: runc would refuse it)
_RLIMITS = [name for name in ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA",
                              "RLIMIT_FSIZE", "RLIMIT_LOCKS", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE",
                              "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS",
                              "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING",
                              "RLIMIT_STACK") if hasattr(resource, name)]


def engine_rlimits(init_pid: object, given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spec's rlimits, plus every other limit as a `docker exec` gets it: inherited from
    the engine's shim (the parent of her container's init), not from the gateway (under
    systemd the gateway's core size is 0, dockerd's unlimited: found on the modern host).
    Where the gateway lacks CAP_SYS_RESOURCE (some hosts deny it even root), capped at its
    own hard limits: runc could not raise them and would fail her session."""
    named = {r.get("type") for r in given}
    try:
        stat = Path(f"/proc/{int(init_pid)}/stat").read_text()  # type: ignore[call-overload]
        shim = int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, TypeError, ValueError, IndexError):
        return given
    out = list(given)
    can_raise = _has_cap(24)  # CAP_SYS_RESOURCE
    for name in _RLIMITS:
        if name in named:
            continue
        which = getattr(resource, name)
        try:
            soft, hard = (_u64(v) for v in resource.prlimit(shim, which))
            own_hard = _u64(resource.getrlimit(which)[1])
        except (OSError, ValueError):
            continue
        if not can_raise:
            hard = min(hard, own_hard)
        out.append({"type": name, "hard": hard, "soft": min(soft, hard)})
    return out


def _has_cap(bit: int) -> bool:
    """The gateway's effective capability set has this one (/proc/self/status CapEff)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


def _u64(value: int) -> int:
    return _U64_MAX if value == resource.RLIM_INFINITY or value < 0 else value


def _close_quietly(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def grow_pipe(fd: int) -> None:
    """A pipe of PIPE_SIZE rather than the kernel's 64 KiB: fewer, larger reads and writes
    between her process and the gateway (pages are only taken while bytes wait in it).
    Best effort: the kernel may refuse (pipe-max-size, a user's pipe page limits)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _spec(base: dict[str, Any], who: Identity, args: list[str], env: dict[str, str],
          workdir: str, tty: bool) -> dict[str, Any]:
    """The container's process spec with what `docker exec -u USER` replaces."""
    spec = dict(base)
    spec["args"] = args
    spec["env"] = merge_env(base.get("env") or [], env)
    spec["cwd"] = workdir
    spec["terminal"] = tty
    spec["user"] = {"uid": who.uid, "gid": who.gid,
                    "additionalGids": list(dict.fromkeys((who.gid, *who.groups)))}
    spec.pop("consoleSize", None)
    return spec


def _spec_fd(spec: dict[str, Any]) -> int:
    """The spec in a memfd (runc's fd 9): no file to clean up, no size limit of a pipe."""
    memfd = os.memfd_create("dgw-process", os.MFD_CLOEXEC)
    try:
        os.write(memfd, json.dumps(spec).encode())
    except BaseException:
        os.close(memfd)
        raise
    return memfd


def merge_env(base: list[str], env: dict[str, str]) -> list[str]:
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
    """`Process` over a runc child (see backend.base.Process)."""

    def __init__(self, pid: int, *, tty: bool, exits: ExitWatch | None = None,
                 child: bool = True) -> None:
        self.pid = pid  # runc's: our child, so the number is ours until we reap it
        self.tty = tty
        self.exit_signal: tuple[str, bool] | None = None  # (name, core dumped): see wait()
        self._exits = exits
        if exits is not None:
            exits.watch(pid)
        self.on_exit: Callable[[], object] | None = None
        # set by the backend: why her container went away (None: it did not), and how to
        # kill what her session left after a hang-up (as her, in her container)
        self.gone: Callable[[], Awaitable[BackendError | None]] | None = None
        self.kill_leftovers: Callable[[], Awaitable[None]] | None = None
        self._hung_up = False
        self._status: int | None = None
        self._exited = asyncio.get_running_loop().create_future()
        self._pidfd = -1
        if child:  # else a subclass learns of the end otherwise (launcher.py)
            self._pidfd = os.pidfd_open(pid)
            asyncio.get_running_loop().add_reader(self._pidfd, self._reap)
        self._queue: deque[tuple[int, bytes]] = deque()
        self._queued = 0
        self._more = asyncio.Event()
        self._readers: list[_Reader] = []
        self._open = 0
        self._writer: FdWriter | None = None
        self._header: FdWriter | None = None  # a terminal spare's header pipe (fd 3 in hers)
        self._master = -1
        self._log = bytearray()
        self._log_done = asyncio.Event()

    # --- set-up -----------------------------------------------------------------------------

    async def attach(self, *, write_fd: int, read_fds: tuple[tuple[int, int], ...],
                     log_fd: int) -> None:
        """Her stdin (-1: none), her output streams and runc's stderr (-1: no runc)."""
        loop = asyncio.get_running_loop()
        for stream, fd in read_fds:
            reader = _Reader(self, stream)
            self._readers.append(reader)
            self._open += 1
            await loop.connect_read_pipe(lambda r=reader: r, os.fdopen(fd, "rb", buffering=0))
        if write_fd >= 0:
            self._writer = FdWriter(write_fd)
        if log_fd >= 0:
            background(self._collect_log(log_fd))
        else:
            self._log_done.set()

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
            if self._open <= 0:
                if self._master >= 0:  # Linux may hang up before the last output arrives
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

    def begin(self, header: bytes, size: tuple[int, int]) -> None:
        """A spare (spares.py) becomes a session: the line it waits for, which makes it `exec`
        the session's program.  A terminal spare reads it from its own pipe, and its terminal
        takes the session's size (columns, rows) first; the program's wrapper sets it too
        (`stty`), so her shell starts at that size whichever comes first."""
        if self._header is None:
            self.write(header)
            return
        self._resize(size[1], size[0])
        self._header.write(header)
        self._header.write_eof()  # closed once written: nothing else ever goes there

    # --- control ----------------------------------------------------------------------------

    async def resize(self, rows: int, cols: int) -> None:
        """Our pty's size, then SIGWINCH: runc copies it onto her terminal."""
        self._resize(rows, cols)

    def _resize(self, rows: int, cols: int) -> None:
        if self._master >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, cols, 0, 0))
                self.send(signals.SIGWINCH)

    def send(self, sig: signals.Signals) -> bool:
        """To runc, which passes it on to her process; False once it has exited."""
        if self._status is not None:
            return False
        try:
            signals.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    @property
    def running(self) -> bool:
        return self._status is None

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._status = os.waitstatus_to_exitcode(status)
        if self._status < 0:
            self._status = 128 - self._status
        if self._exits is not None:
            # 128+N from runc: her process killed by signal N, or her `exit 128+N`?
            raw = self._exits.take(self.pid)
            if raw is not None and os.WIFSIGNALED(raw) and \
                    128 + os.WTERMSIG(raw) == self._status:
                self.exit_signal = (signals.Signals(os.WTERMSIG(raw)).name[3:],
                                    os.WCOREDUMP(raw))
        if not self._exited.done():
            self._exited.set_result(self._status)

    async def signal(self, name: str) -> None:
        """The client's signal, through runc to her process (runc passes every signal on)."""
        if name in SIGNALS:
            self.send(getattr(signals, f"SIG{name}"))

    async def wait(self) -> int:
        """Her process's exit status (runc's, which is hers: 128+N if signal N killed it;
        `exit_signal` then names N when the kernel told us so).  If runc could not start it,
        or a signal came with the end of her whole container, the reason as a BackendError."""
        status = await asyncio.shield(self._exited)
        await self._log_done.wait()
        failed = ""
        if status != 0 and self._log:  # her own stderr is elsewhere: this is runc's
            lines = [line for line in self._log.decode(errors="replace").splitlines()
                     if line.strip() and not re.search(r"level=(warning|info|debug)", line)]
            failed = "\n".join(lines)
        if (failed or status >= 128) and self.gone is not None:
            # killed: by her, or with her whole container (removed, stopped, OOM)?  runc
            # knows before the engine does: look again briefly.
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
        """Our side ends, as with sshd: the pipes close (her command's input ends) or the pty
        master does (the kernel hangs up her terminal: her shell gets SIGHUP).  What is still
        running after HANGUP_GRACE is killed, its process group too; what she detached
        (setsid, nohup, tmux) lives on."""
        if self._writer is not None:
            self._writer.close()
        if self._header is not None:  # an unused spare's read ends: it exits
            self._header.close()
        for r in self._readers:
            if r.transport is not None:
                r.transport.close()
        if self._master >= 0:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = -1
        if self._status is None and not self._hung_up:
            self._hung_up = True
            if self.tty:  # her shell is told, and bash tells its jobs (as sshd's hang-up)
                self.send(signals.SIGHUP)
            background(self._hang_up())

    async def _hang_up(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), HANGUP_GRACE)
        except TimeoutError:
            if self.kill_leftovers is not None:
                await self.kill_leftovers()
                log.info("killed the leftover session process (pid %d) after %.0f s",
                         self.pid, HANGUP_GRACE)


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
