"""One SSH session channel proxied to one process in the user's environment.

Read top to bottom, this is the whole data path: the SSH client asks for a pty / shell / exec /
subsystem; once the channel is started we make sure the user's environment is ready
(`backend.ensure`), turn the request into a process (`program`), start it (`backend.start`) and
pump bytes both ways until the process ends, then hand its exit status back.  asyncssh's
`redirect()` is deliberately not used: it does not forward resize and signals, and is slow
(see shared/notes/asyncssh-and-exec.md).  Nothing here knows which platform runs the process.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncssh

from ..aio import background
from ..backend import Process
from ..errors import GatewayError
from ..observe.recording import Recording
from .context import ConnectionInfo
from .program import SessionRequest, login_line, program

log = logging.getLogger("dind_gateway.session")

_HIGH_WATER = 1024 * 1024  # bytes queued towards the process before we stop reading


class GatewaySession(asyncssh.SSHServerSession):
    """Session channel handler; one instance per `session` channel."""

    def __init__(self, conn: ConnectionInfo) -> None:
        self._conn = conn
        self._chan: asyncssh.SSHServerChannel | None = None
        self._term_type = ""
        self._size = (80, 24)
        self._kind = ""  # shell | exec | sftp
        self._command: str | None = None
        self._proc: Process | None = None
        self._inq: list[bytes] = []  # client input not yet written to the process
        self._eof = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._recording: Recording | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # --- requests from the client (all deny unless meant) --------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: asyncssh.TermModes) -> bool:
        if not self._conn.key_allows("pty"):
            return False
        self._term_type = term_type
        if term_size[0] and term_size[1]:
            self._size = (term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        self._kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self._kind, self._command = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != "sftp":
            return False
        self._kind = "sftp"
        return True

    def session_started(self) -> None:
        self._task = asyncio.create_task(self._run())

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.bytes_in += len(data)
        self._inq.append(data)
        if self._proc is None:
            # No process yet (first contact can take seconds): hold the rest in asyncssh, whose
            # window then stops the client, instead of queueing without bound; _run resumes.
            assert self._chan is not None
            self._chan.pause_reading()
            return
        # One socket write per event-loop pass, not one per 32 KiB SSH packet.
        if len(self._inq) == 1:
            asyncio.get_running_loop().call_soon(self._flush_input)

    def _flush_input(self) -> None:
        if self._proc is None or not self._inq:
            return
        self._proc.write(b"".join(self._inq) if len(self._inq) > 1 else self._inq[0])
        self._inq.clear()
        if self._proc.buffered() > _HIGH_WATER:
            assert self._chan is not None
            self._chan.pause_reading()
            background(self._drain_then_resume(self._proc))

    def eof_received(self) -> bool:
        self._eof = True
        if self._proc is not None and not self._tty:
            self._flush_input()
            self._proc.write_eof()
        return True  # keep our side open: output may still be coming

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        if width and height:
            self._size = (width, height)
            if self._recording is not None:
                self._recording.resize(width, height)
            if self._proc is not None:
                background(self._proc.resize(height, width))

    def signal_received(self, signal: str) -> None:
        if self._proc is not None:
            background(self._proc.signal(signal))

    def break_received(self, msec: int) -> bool:
        return False

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.session_closed(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._proc is not None:
            self._proc.close()

    # --- the data path ----------------------------------------------------------------------

    @property
    def session_type(self) -> str:
        """shell, exec, sftp, scp or rsync: what the audit log and metrics call it."""
        if self._kind == "exec" and self._command:
            first = self._command.split(None, 1)[0]
            if first in ("scp", "rsync"):
                return first
        return self._kind or "session"

    @property
    def _tty(self) -> bool:
        return bool(self._term_type)

    async def _run(self) -> None:
        assert self._chan is not None
        chan, conn, ctx = self._chan, self._conn, self._conn.ctx
        started = time.monotonic()
        status = 255
        signalled: tuple[str, bool] | None = None  # (name, core dumped): exit-signal
        kind = self.session_type
        user = conn.user
        ctx.events.emit("session.start", conn=conn.id, user=user.name, type=kind,
                        command=self._command, pty=self._tty)
        try:
            if self._kind == "exec" and (self._command or "").split()[:1] == ["mosh-server"]:
                # mosh bootstraps over ssh, then talks UDP to the address it was given: that
                # is the gateway, and no UDP reaches her container
                ctx.events.emit("session.refused", conn=conn.id, user=user.name,
                                reason="mosh is not supported")
                raise GatewayError("mosh is not supported here (its UDP traffic cannot reach "
                                   "your container); use plain ssh, with tmux for sessions "
                                   "that survive a lost connection.", "mosh refused", "mosh")
            await ctx.ensure(user, self._progress)
            if self._kind == "shell" and self._tty and conn.forced_command() is None:
                self._stderr(login_line(user, ctx.config.help_contact))
            if self._tty and user.record:
                self._start_recording()
            request = SessionRequest(kind=self._kind, command=self._command,
                                     term_type=self._term_type, size=self._size,
                                     client_env=self._chan.get_environment(),
                                     ssh_connection=conn.ssh_connection)
            env = ctx.backend.environment(user.name)
            agent = await conn.agent_socket()
            if agent is not None:
                env["SSH_AUTH_SOCK"] = agent
            spec = program(request, conn.principal, env)
            self._proc = await ctx.backend.start(spec)
            if self._tty:
                background(self._proc.resize(self._size[1], self._size[0]))
            self._flush_input()
            if self._eof and not self._tty:
                self._proc.write_eof()
            chan.resume_reading()
            await self._pump_output(self._proc)
            status = await self._proc.wait()
            signalled = self._proc.exit_signal
        except GatewayError as exc:
            log.warning("[%s] %s: %s", conn.tag, user.name, exc)
            self._stderr(f"dind-gateway: {exc.user_message}\n")
            status = 1
        except Exception:  # noqa: BLE001 - a bug must end this session, not the gateway
            log.exception("[%s] session of %s failed", conn.tag, user.name)
            self._stderr("dind-gateway: internal error; please tell your admin.\n")
            status = 1
        finally:
            if self._proc is not None:
                self._proc.close()
            if self._recording is not None:
                self._recording.close()
            duration = time.monotonic() - started
            log.info("[%s] %s session of %s ended: status %s, %d B in, %d B out, %.2f s",
                     conn.tag, kind, user.name, status, self.bytes_in,
                     self.bytes_out, duration)
            ctx.events.emit("session.end", conn=conn.id, user=user.name,
                            type=kind, command=self._command, exit_status=status,
                            bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                            duration=round(duration, 3))
        if not chan.is_closing():
            if signalled is not None:  # as sshd: the client's ssh then exits 255
                chan.exit_with_signal(signalled[0], signalled[1])
            else:
                chan.exit(status)

    async def _pump_output(self, proc: Process) -> None:
        """Process → client, pausing whenever the SSH channel's window is full."""
        assert self._chan is not None
        while True:
            stream, data = await proc.read()
            if not stream:
                return
            self.bytes_out += len(data)
            if self._recording is not None:
                self._recording.output(data)
            if stream == 2:
                self._chan.write_stderr(data)
            else:
                self._chan.write(data)
            if not self._writable.is_set():
                await self._writable.wait()

    async def _drain_then_resume(self, proc: Process) -> None:
        try:
            await proc.drain()
        except (ConnectionError, RuntimeError):
            pass
        if self._chan is not None and not self._chan.is_closing():
            self._chan.resume_reading()

    def _start_recording(self) -> None:
        """Her pty session is recorded (users.yaml `record:`); she is told so before it starts."""
        conn, config = self._conn, self._conn.ctx.config
        self._recording = Recording.open(
            config.recordings_dir, user=conn.user.name, conn=conn.id, width=self._size[0],
            height=self._size[1], term=self._term_type, command=self._command,
            max_size=config.recording_max_size, events=conn.ctx.events)
        if self._recording is not None:
            self._stderr("dind-gateway: this session is recorded (what your terminal shows, "
                         "not what you type).\n")

    def notify(self, message: str) -> None:
        """A one-line notice from the gateway (shutdown, revoked access) on stderr."""
        self._stderr(f"\ndind-gateway: {message}\n")

    def _progress(self, text: str) -> None:
        self._stderr(text)

    def _stderr(self, text: str) -> None:
        """Messages from the gateway: stderr only, never into a protocol stream on stdout."""
        if self._chan is None or self._chan.is_closing():
            return
        if self._tty:
            text = text.replace("\n", "\r\n")
        self._chan.write_stderr(text.encode())
