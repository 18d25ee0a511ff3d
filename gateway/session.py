"""One SSH session channel proxied to one process in the user's container.

Read top to bottom, this is the whole data path: the SSH client asks for a pty / shell / exec /
subsystem; once the channel is started we make sure the user's environment is ready, start the
matching process there through `docker exec`, and pump bytes both ways until the process ends,
then hand its exit status back.  asyncssh's `redirect()` is deliberately not used: it does not
forward resize and signals, and is slow (see shared/notes/asyncssh-and-exec.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING

import asyncssh

from .aio import background
from .backend import INNER_DOCKER_HOST, BackendError, ExecProcess
from .dockerapi import DockerError

if TYPE_CHECKING:
    from .config import User
    from .server import Connection

log = logging.getLogger("dind_gateway.session")

SFTP_SERVER = "/usr/libexec/sftp-server"
# Client variables let through, as OpenSSH's default AcceptEnv on Debian does.
_ENV_ALLOWED = re.compile(r"LANG|LC_[A-Z_]+|TERM|COLORTERM")  # fullmatch: no "LANG\n"
_SIGNALS = {"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
            "USR1", "USR2"}
_HIGH_WATER = 1024 * 1024  # bytes queued towards the container before we stop reading
_READ_CHUNK = 256 * 1024

# Runs inside the container before the user's program.  It sets the terminal size (the engine
# ignores the initial console size), records its PID so signals can be delivered later, picks
# the shell and replaces itself with it so the exit status and signals are the program's own.
_WRAPPER = r"""
[ -n "$DGW_ROWS" ] && stty rows "$DGW_ROWS" cols "$DGW_COLS" 2>/dev/null
[ -n "$DGW_PIDFILE" ] && echo $$ > "$DGW_PIDFILE"
sh_=${DGW_SHELL:-/bin/bash}
[ -x "$sh_" ] || sh_=/bin/bash
[ -x "$sh_" ] || sh_=/bin/sh
unset DGW_ROWS DGW_COLS DGW_PIDFILE DGW_SHELL
export SHELL="$sh_"
cd "$HOME" 2>/dev/null
[ $# -eq 0 ] && exec "$sh_" -l
exec "$sh_" -c "$1"
"""


class GatewaySession(asyncssh.SSHServerSession):
    """Session channel handler; one instance per `session` channel."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._chan: asyncssh.SSHServerChannel | None = None
        self._term_type = ""
        self._size = (80, 24)
        self._kind = ""  # shell | exec | sftp
        self._command: str | None = None
        self._proc: ExecProcess | None = None
        self._inq: list[bytes] = []  # client input not yet written to the process
        self._eof = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._pidfile = f"/run/dgw-sessions/{secrets.token_hex(8)}"
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
        self._conn.session_opened(self)
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
        self._proc.stream.write(b"".join(self._inq) if len(self._inq) > 1 else self._inq[0])
        self._inq.clear()
        if self._proc.stream.buffered() > _HIGH_WATER:
            assert self._chan is not None
            self._chan.pause_reading()
            background(self._drain_then_resume(self._proc))

    def eof_received(self) -> bool:
        self._eof = True
        if self._proc is not None and not self._tty:
            self._flush_input()
            self._proc.stream.write_eof()
        return True  # keep our side open: output may still be coming

    def terminal_size_changed(self, width: int, height: int, pixwidth: int,
                              pixheight: int) -> None:
        if width and height:
            self._size = (width, height)
            if self._proc is not None:
                background(self._proc.resize(height, width))

    def signal_received(self, signal: str) -> None:
        if signal in _SIGNALS and self._proc is not None:
            background(self._deliver_signal(signal))

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
            self._proc.stream.close()

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
        chan, conn = self._chan, self._conn
        started = time.monotonic()
        status = 255
        kind = self.session_type
        conn.gateway.events.emit("session.start", conn=conn.id, user=conn.user.name, type=kind,
                                 command=self._command, pty=self._tty)
        try:
            await conn.gateway.ensure_environment(conn.user, self._progress)
            if self._kind == "shell" and self._tty and conn.forced_command() is None:
                self._stderr(login_line(conn.user, conn.gateway.config.help_contact))
            argv, env = self._program()
            self._proc = await conn.gateway.backend.exec(
                conn.user.name, argv, tty=self._tty, env=env, run_as=conn.user.name,
                workdir=f"/home/{conn.user.name}")
            if self._tty:
                background(self._proc.resize(self._size[1], self._size[0]))
            self._flush_input()
            if self._eof and not self._tty:
                self._proc.stream.write_eof()
            chan.resume_reading()
            await self._pump_output(self._proc)
            status = await self._proc.wait()
        except BackendError as exc:
            log.warning("[%s] %s: %s", conn.tag, conn.user.name, exc)
            self._stderr(f"dind-gateway: {exc.user_message}\n")
            status = 1
        except DockerError as exc:
            log.error("[%s] docker error for %s: %s", conn.tag, conn.user.name, exc)
            self._stderr("dind-gateway: the container engine failed; please try again.\n")
            status = 1
        finally:
            if self._proc is not None:
                self._proc.stream.close()
            duration = time.monotonic() - started
            log.info("[%s] %s session of %s ended: status %s, %d B in, %d B out, %.2f s",
                     conn.tag, kind, conn.user.name, status, self.bytes_in,
                     self.bytes_out, duration)
            conn.gateway.events.emit("session.end", conn=conn.id, user=conn.user.name,
                                     type=kind, command=self._command, exit_status=status,
                                     bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                                     duration=round(duration, 3))
        if not chan.is_closing():
            chan.exit(status)

    async def _pump_output(self, proc: ExecProcess) -> None:
        """Container → client, pausing whenever the SSH channel's window is full."""
        assert self._chan is not None
        while True:
            stream, data = await proc.stream.read()
            if not stream:
                return
            self.bytes_out += len(data)
            if stream == 2:
                self._chan.write_stderr(data)
            else:
                self._chan.write(data)
            if not self._writable.is_set():
                await self._writable.wait()

    async def _drain_then_resume(self, proc: ExecProcess) -> None:
        try:
            await proc.stream.drain()
        except (ConnectionError, RuntimeError):
            pass
        if self._chan is not None and not self._chan.is_closing():
            self._chan.resume_reading()

    def _program(self) -> tuple[list[str], dict[str, str]]:
        """The argv and environment for this session's process in the container."""
        conn, user = self._conn, self._conn.user
        home = f"/home/{user.name}"
        env = {k: v for k, v in (self._chan.get_environment() if self._chan else {}).items()
               if _ENV_ALLOWED.fullmatch(k)}
        env.update(conn.key_environment())
        env.update({
            "DOCKER_HOST": INNER_DOCKER_HOST, "USER": user.name, "LOGNAME": user.name,
            "HOME": home, "SSH_CONNECTION": conn.ssh_connection})
        if self._tty:
            env["TERM"] = self._term_type
            env["DGW_ROWS"], env["DGW_COLS"] = str(self._size[1]), str(self._size[0])
        else:
            env.pop("TERM", None)
        env["DGW_PIDFILE"] = self._pidfile
        if user.shell:
            env["DGW_SHELL"] = user.shell
        forced = conn.forced_command()
        if forced is not None:
            if self._kind == "exec":
                env["SSH_ORIGINAL_COMMAND"] = self._command or ""
            return ["/bin/sh", "-c", _WRAPPER, "dgw", forced], env
        if self._kind == "sftp":
            return [SFTP_SERVER], env
        if self._kind == "exec":
            return ["/bin/sh", "-c", _WRAPPER, "dgw", self._command or ""], env
        return ["/bin/sh", "-c", _WRAPPER, "dgw"], env

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

    async def _deliver_signal(self, signal: str) -> None:
        """Engine has no exec-signal API: a second exec signals the recorded PID.  It runs as
        the user, so a PID she wrote into the file can only ever name her own processes."""
        try:
            await self._conn.gateway.backend.run(
                self._conn.user.name, ["sh", "-c", f'kill -s {signal} "$(cat {self._pidfile})"'])
        except DockerError as exc:
            log.debug("signal %s not delivered: %s", signal, exc)


def login_line(user: User, help_contact: str | None) -> str:
    """The line an interactive shell starts with: the user's limits and where to get help."""
    def size(n: int) -> str:
        for unit, factor in (("GiB", 2**30), ("MiB", 2**20)):
            if n >= factor:
                return f"{n / factor:.1f}".removesuffix(".0") + f" {unit}"
        return f"{n} B"

    cpus = "unlimited" if user.cpus is None else f"{user.cpus:g}"
    memory = "unlimited" if user.memory is None else size(user.memory)
    pids = "unlimited" if user.pids is None else str(user.pids)
    return (f"dind-gateway: limits for {user.name}: cpus {cpus}, memory {memory}, pids {pids}; "
            f"help: {help_contact or 'ask your administrator'}\n")
