"""A backend of local processes: the contract without containers, for fast tests and demos.

Each user's "environment" is a directory with a home in it; processes run on this machine as
the gateway's own user, with pipes or a real pty.  It isolates nothing, so the gateway refuses
it unless gateway.yaml names it (`backend: fake`).  Variants make the hard cases cheap to test:
`hold(user)` keeps the next start waiting until released (slow first contact), `fail(user,
...)` makes starts fail as a crashing or never-ready environment would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import secrets
import shutil
import signal as signals
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..aio import FdWriter
from ..errors import os_reason
from ..observe.events import Events
from .base import (
    Backend,
    BackendError,
    EnvState,
    EnvStats,
    Limits,
    ProcessSpec,
    Progress,
    SocketListener,
)

SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server",
                "/usr/lib/sftp-server")
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
_READ = 256 * 1024
HANGUP_GRACE = 5.0


@dataclass
class _Env:
    running: bool = False
    started_at: float = 0.0
    limits: Limits = field(default_factory=Limits)
    processes: set[asyncio.subprocess.Process] = field(default_factory=set)


class _PtyOutput(asyncio.Protocol):
    """The pty master's output straight into the process's queue.  Not a StreamReader: its
    read() raises a pending EIO before returning what it still buffers, and a short command
    (`ssh -tt devbox tty`) has often written and exited before the first read, so its whole
    output was lost (under load, in one run of three)."""

    def __init__(self, out: asyncio.Queue[tuple[int, bytes]]) -> None:
        self.out = out
        self.ended = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.out.put_nowait((1, data))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:  # EIO: the pty's end
        if not self.ended.done():
            self.ended.set_result(None)


class FakeProcess:
    """`Process` over a local child: pipes, or a pty when a terminal was asked for."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int | None) -> None:
        self._proc = proc
        self._master = master
        self._out: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self._open = 2 if master is None else 1
        # the pty's input: not loop.connect_write_pipe (uvloop reads a write pipe to notice
        # its peer closing, which on a pty master throws the terminal's output away)
        self._pty_writer: FdWriter | None = None
        self._pty_reader: asyncio.BaseTransport | None = None
        self._foreground: int | None = None  # the pty's foreground group when we hung up
        self.exit_signal: tuple[str, bool] | None = None
        self._tasks = [asyncio.ensure_future(self._pump(1, proc.stdout))] if master is None \
            else []
        if master is None:
            self._tasks.append(asyncio.ensure_future(self._pump(2, proc.stderr)))

    @classmethod
    async def open_pty(cls, proc: asyncio.subprocess.Process, master: int) -> FakeProcess:
        self = cls(proc, master)
        output = _PtyOutput(self._out)
        self._pty_reader, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: output, os.fdopen(os.dup(master), "rb", buffering=0))
        self._pty_writer = FdWriter(os.dup(master))
        self._tasks.append(asyncio.ensure_future(self._pty_ended(output)))
        return self

    async def _pump(self, stream: int, reader: asyncio.StreamReader | None) -> None:
        try:
            while reader is not None:
                data = await reader.read(_READ)
                if not data:
                    break
                await self._out.put((stream, data))
        finally:
            await self._out.put((0, b""))

    async def _pty_ended(self, output: _PtyOutput) -> None:
        try:
            await output.ended
            # Linux may report the hang-up before the last output reached the master: once
            # the child is gone, read what is left
            await self._proc.wait()
            while self._master is not None and self._master >= 0:
                try:
                    data = os.read(self._master, _READ)
                except OSError:  # EIO (nothing left) or EAGAIN
                    break
                if not data:
                    break
                await self._out.put((1, data))
        finally:
            await self._out.put((0, b""))

    def write(self, data: bytes) -> None:
        if self._master is not None:
            if self._pty_writer is not None:
                self._pty_writer.write(data)
        elif self._proc.stdin is not None and not self._proc.stdin.is_closing():
            self._proc.stdin.write(data)

    def write_eof(self) -> None:
        """stdin ends (a pipe closes).  Never for a terminal: as with sshd, nothing happens."""
        w = self._proc.stdin
        if self._master is None and w is not None and not w.is_closing() and w.can_write_eof():
            w.write_eof()

    def buffered(self) -> int:
        if self._master is not None:
            return 0 if self._pty_writer is None else self._pty_writer.buffered()
        w = self._proc.stdin
        return 0 if w is None or w.is_closing() else w.transport.get_write_buffer_size()

    async def drain(self) -> None:
        if self._master is not None:
            if self._pty_writer is not None:
                await self._pty_writer.drain()
        elif self._proc.stdin is not None and not self._proc.stdin.is_closing():
            await self._proc.stdin.drain()

    async def read(self) -> tuple[int, bytes]:
        while self._open:
            stream, data = await self._out.get()
            if stream:
                return stream, data
            self._open -= 1
        return 0, b""

    async def resize(self, rows: int, cols: int) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", rows, cols, 0, 0))

    async def signal(self, name: str) -> None:
        sig = getattr(signals, f"SIG{name}", None)
        if isinstance(sig, signals.Signals) and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def wait(self) -> int:
        code = await self._proc.wait()
        if code < 0:  # a local child: its wait status is ours
            self.exit_signal = (signals.Signals(-code).name[3:], False)
        return 128 - code if code < 0 else code

    def close(self) -> None:
        """Our side is gone: hang up as sshd does (the pty's master closes, so the kernel
        signals her shell; its foreground job and the shell's own group get SIGHUP), and
        after HANGUP_GRACE kill what ignored it. Jobs she detached (setsid, nohup) live on."""
        if self._master is not None and self._master >= 0:
            self._foreground = self._her_group(os.tcgetpgrp, self._master)
        if self._pty_writer is not None:
            self._pty_writer.close()
        elif self._proc.stdin is not None:
            self._proc.stdin.close()
        if self._pty_reader is not None:
            self._pty_reader.close()
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = -1
        if self._proc.returncode is None or self._foreground is not None:
            for group in (self._proc.pid, self._foreground):
                if group is not None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, signals.SIGHUP)
            asyncio.get_running_loop().call_later(HANGUP_GRACE, self._kill_leftovers)

    def _her_group(self, find: Callable[[int], int], arg: int | None) -> int | None:
        """A process group of her shell's session other than the shell's own, else None: never
        0 (that would be ours) nor a number reused since by someone else."""
        try:
            group = find(arg) if arg is not None else 0
            if group > 0 and group != self._proc.pid and os.getsid(group) == self._proc.pid:
                return group
        except OSError:
            pass
        return None

    def _kill_leftovers(self) -> None:
        """... and what is still there after the grace period is killed (as Docker's is):
        the shell's group if the shell ignored the hang-up, the foreground job's group always
        (it belonged to the terminal that is gone)."""
        groups = [self._her_group(lambda g: g, self._foreground)]
        if self._proc.returncode is None:
            groups.append(self._proc.pid)
        for group in groups:
            if group is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signals.SIGKILL)


class FakeBackend(Backend):
    """Environments as directories under `root`; processes on this machine."""

    def __init__(self, root: Path, *, events: Events | None = None) -> None:
        self.root = Path(root)
        self.events = events or Events()
        self._envs: dict[str, _Env] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._holds: dict[str, asyncio.Event] = {}
        self._failures: dict[str, BackendError] = {}
        self.workloads: set[str] = set()  # users whose environment is "busy on its own"

    # --- test hooks -------------------------------------------------------------------------

    def hold(self, user: str) -> asyncio.Event:
        """Make the next start of `user` wait until the returned event is set."""
        return self._holds.setdefault(user, asyncio.Event())

    def fail(self, user: str, reason: str = "crashed", message: str = "") -> None:
        """Make starts of `user` fail (reason crashed / timeout) until `fail(user, "")`."""
        if not reason:
            self._failures.pop(user, None)
            return
        text = message or ("Your environment stopped while starting." if reason == "crashed"
                           else "Your environment did not become ready in time.")
        self._failures[user] = BackendError(text, f"fake {user}: {reason}", reason)

    def home(self, user: str) -> Path:
        return self.root / user / "home"

    # --- contract ---------------------------------------------------------------------------

    def _lock(self, user: str) -> asyncio.Lock:
        return self._locks.setdefault(user, asyncio.Lock())

    async def ensure(self, user: str, limits: Limits,
                     progress: Progress | None = None) -> EnvState:
        async with self._lock(user):
            env = self._envs.setdefault(user, _Env())
            if env.running:
                return self._state(user)
            if progress:
                progress("Starting your environment…")
            t0 = time.monotonic()
            hold = self._holds.pop(user, None)
            if hold is not None:
                await hold.wait()
            failure = self._failures.get(user)
            if failure is not None:
                raise failure
            self.home(user).mkdir(parents=True, exist_ok=True)
            env.running, env.started_at, env.limits = True, time.time(), limits
            state = self._state(user)
            self._ready_now(user, f"fake-{user}", state, t0, progress)
            return state

    async def stop(self, user: str, *, unless: Callable[[], bool] | None = None) -> bool:
        async with self._lock(user):
            if unless is not None and unless():
                return False
            env = self._envs.get(user)
            if env is None or not env.running:
                return False
            env.running = False
            for proc in list(env.processes):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signals.SIGKILL)
        self.events.emit("container.stop", user=user, container=f"fake-{user}")
        return True

    async def inspect(self, user: str) -> EnvState:
        return self._state(user)

    def _state(self, user: str) -> EnvState:
        env = self._envs.get(user)
        if env is None:
            return EnvState(user=user, exists=False)
        return EnvState(user=user, exists=True, running=env.running, container_id=f"fake-{user}",
                        started_at=str(env.started_at), ip="127.0.0.1",
                        status="running" if env.running else "exited", limits=env.limits)

    def _argv(self, spec: ProcessSpec) -> list[str]:
        shell = spec.shell if spec.shell and os.access(spec.shell, os.X_OK) else "/bin/sh"
        if spec.kind == "argv":
            return list(spec.argv)
        if spec.kind == "sftp":
            found = next((p for p in SFTP_SERVERS if os.access(p, os.X_OK)), None)
            if found is None:
                raise BackendError("sftp is not available here", "no sftp-server found",
                                   "no-sftp")
            return [found]
        if spec.kind == "command":
            return [shell, "-c", spec.command]
        return [shell, "-l"]

    async def start(self, spec: ProcessSpec) -> FakeProcess:
        try:
            return await self._start(spec)
        except OSError as exc:  # e.g. E2BIG: what a shell would say, as her shell's error
            raise BackendError(f"sh: {exc.strerror or exc}", f"fake {spec.user}: {exc}",
                               "exec-failed") from exc

    async def _start(self, spec: ProcessSpec) -> FakeProcess:
        env = self._envs.get(spec.user)
        if env is None or not env.running:
            raise BackendError("your environment is not running", f"fake {spec.user}: stopped",
                               "not-running")
        home = self.home(spec.user)
        variables = {"PATH": "/usr/local/bin:/usr/bin:/bin", **spec.env, "HOME": str(home)}
        if spec.kind == "shell":
            variables["SHELL"] = self._argv(spec)[0]
        cwd = home if spec.workdir in (None, f"/home/{spec.user}") else Path(spec.workdir)
        argv = self._argv(spec)
        if not spec.tty:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=cwd, env=variables,
                start_new_session=True)
            self._track(env, proc)
            return FakeProcess(proc, None)
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", spec.size[1], spec.size[0],
                                                           0, 0))

        def controlling_tty() -> None:
            """In the child, before exec.  The stock loop has already made it a session
            leader with the slave on 0, 1, 2; uvloop (the gateway's loop) runs this before
            both (TIOCSCTTY on fd 0 failed: ENOTTY), so the session is made here if needed and
            the slave named by its own fd, open in the child until exec."""
            if os.getsid(0) != os.getpid():
                os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=variables,
                start_new_session=True, preexec_fn=controlling_tty)
        finally:
            os.close(slave)
        self._track(env, proc)
        return await FakeProcess.open_pty(proc, master)

    @staticmethod
    def _track(env: _Env, proc: asyncio.subprocess.Process) -> None:
        env.processes.add(proc)
        asyncio.ensure_future(proc.wait()).add_done_callback(
            lambda _: env.processes.discard(proc))

    async def open_connection(self, user: str, port: int) -> socket.socket:
        return await _connect(socket.AF_INET, ("127.0.0.1", port), f"port {port}", user)

    async def open_unix(self, user: str, path: str) -> socket.socket:
        """Only below this user's directory (the fake isolates nothing else)."""
        base, target = await asyncio.to_thread(
            lambda: (os.path.realpath(self.root / user), os.path.realpath(path)))
        if os.path.commonpath([base, target]) != base:
            raise BackendError(f"cannot connect to {path}: not in your environment",
                               f"fake {user}: {path} outside {base}", "connect-failed")
        return await _connect(socket.AF_UNIX, target, path, user)

    async def listen_tcp(self, user: str, port: int) -> SocketListener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise BackendError(f"cannot listen on port {port}: {os_reason(exc)}",
                               f"fake {user}: listen {port}: {exc}", "listen-failed") from exc
        return SocketListener(sock)

    async def listen_unix(self, user: str, name: str) -> SocketListener:
        directory = self.root / user / "run" / secrets.token_hex(8)
        directory.mkdir(parents=True, mode=0o700)
        path = directory / name
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(16)
        sock.setblocking(False)

        def cleanup() -> None:
            sock.close()
            shutil.rmtree(directory, ignore_errors=True)

        return SocketListener(sock, str(path), cleanup)

    def aliases(self, user: str) -> set[str]:
        return _LOCAL_NAMES | {f"{user}-devbox", "devbox"}

    def environment(self, user: str) -> dict[str, str]:
        return {"DGW_BACKEND": "fake"}

    async def list_environments(self) -> list[EnvState]:
        return [self._state(u) for u in self._envs]

    async def has_workloads(self, user: str) -> bool:
        return user in self.workloads

    async def update_limits(self, user: str, limits: Limits) -> None:
        env = self._envs.get(user)
        if env is not None:
            env.limits = limits

    async def purge(self, user: str) -> None:
        await self.stop(user)
        async with self._lock(user):
            self._envs.pop(user, None)
            shutil.rmtree(self.root / user, ignore_errors=True)
        self.events.emit("container.purge", user=user)

    async def stats(self, user: str) -> EnvStats:
        env = self._envs.get(user)
        if env is None or not env.running:
            return EnvStats()
        return EnvStats(uptime=time.time() - env.started_at, pids=len(env.processes),
                        mem_limit=env.limits.memory)

    async def health(self) -> str:
        return "ok (fake backend)"

    async def close(self) -> None:
        for user in list(self._envs):
            await self.stop(user)



async def _connect(family: int, address: object, what: str, user: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        raise BackendError(f"connection to {what} failed: {os_reason(exc)}",
                           f"fake {user}: connect {address}: {exc}", "connect-failed") from exc
    return sock
