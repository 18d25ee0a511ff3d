"""A session's process as a `docker exec`: the wrapper, resize, signals and the exit status.

The engine has neither an initial console size nor a signal API for execs, so every session
runs through a small shell wrapper that sets the terminal size, records its PID in a file
(signals are then delivered by a second exec, as the user) and replaces itself with the
user's shell, so that exit status and signals are the program's own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from ...aio import background
from ..base import BackendError, ProcessSpec
from .engine import DockerClient, DockerError, EngineUnreachable, ExecStream

log = logging.getLogger("dind_gateway.backend")

SFTP_SERVER = "/usr/libexec/sftp-server"
HANGUP_GRACE = 5.0  # seconds between a client's disconnect and SIGKILL of what it left
HANGUP_RETRY = 600.0  # how long a hang-up waits for an engine that does not answer
PIDFILE_DIR = "/run/dgw-sessions"
SIGNALS = {"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
           "USR1", "USR2"}

# A session's PID file holds "PID STARTTIME" (field 22 of /proc/PID/stat), so a PID reused by
# another of her processes is never signalled.  `live_` prints the PID while that very
# process runs.
LIVE = r"""
live_() {
  set -- $(cat "$1" 2>/dev/null)
  [ -n "$2" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20)" = "$2" ] &&
    echo "$1"
}
"""

# Runs inside the container before the user's program.  It sets the terminal size (the engine
# ignores the initial console size), records its PID so signals can be delivered later, picks
# the shell and replaces itself with it so the exit status and signals are the program's own.
# It also removes the PID files of sessions that have ended (they would otherwise fill /run
# over thousands of logins).
WRAPPER = LIVE + r"""
[ -n "$DGW_ROWS" ] && stty rows "$DGW_ROWS" cols "$DGW_COLS" 2>/dev/null
if [ -n "$DGW_PIDFILE" ]; then
  for f_ in /run/dgw-sessions/*; do
    [ -f "$f_" ] && [ -z "$(live_ "$f_")" ] && rm -f "$f_"
  done 2>/dev/null
  echo "$$ $(sed 's/.*) //' /proc/$$/stat | cut -d' ' -f20)" > "$DGW_PIDFILE"
fi
unset -f live_
sh_=${DGW_SHELL:-/bin/bash}
[ -x "$sh_" ] || sh_=/bin/bash
[ -x "$sh_" ] || sh_=/bin/sh
unset DGW_ROWS DGW_COLS DGW_PIDFILE DGW_SHELL
export SHELL="$sh_"
cd "$HOME" 2>/dev/null
[ $# -eq 0 ] && exec "$sh_" -l
exec "$sh_" -c "$1"
"""

# What a previous gateway process left: its sessions' clients are gone with it.  As the user:
# hang up each recorded session (its process group too) and print "PID:STARTTIME" of each;
# KILLER kills those still there after the grace.
REAPER = LIVE + r"""
cd /run/dgw-sessions 2>/dev/null || exit 0
for f in *; do
  [ -f "$f" ] || continue
  p=$(live_ "$f"); s=$(cut -d' ' -f2 "$f"); rm -f "$f"
  [ -n "$p" ] || continue
  kill -s HUP -- "-$p" 2>/dev/null; kill -s HUP "$p" 2>/dev/null; echo "$p:$s"
done
"""
KILLER = r"""
for ps in "$@"; do
  p=${ps%%:*}
  [ "$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f20)" = "${ps#*:}" ] || continue
  kill -s KILL -- "-$p" 2>/dev/null; kill -s KILL "$p" 2>/dev/null
done
true
"""

Runner = Callable[[str, list[str]], Awaitable[tuple[int, bytes]]]


def exec_argv(spec: ProcessSpec) -> tuple[list[str], dict[str, str], str | None]:
    """argv, environment and pidfile of the exec that runs `spec`."""
    env = dict(spec.env)
    if spec.kind == "argv":
        return list(spec.argv), env, None
    if spec.kind == "sftp":
        return [SFTP_SERVER], env, None
    pidfile = f"{PIDFILE_DIR}/{secrets.token_hex(8)}"
    if spec.tty:
        env["DGW_ROWS"], env["DGW_COLS"] = str(spec.size[1]), str(spec.size[0])
    env["DGW_PIDFILE"] = pidfile
    if spec.shell:
        env["DGW_SHELL"] = spec.shell
    # $0 is "sh": a shell error (e.g. an argument list too long) names no helper of ours
    argv = ["/bin/sh", "-c", WRAPPER, "sh"]
    if spec.kind == "command":
        argv.append(spec.command)
    return argv, env, pidfile


class DockerProcess:
    """`Process` over one exec's hijacked stream (see backend.base.Process)."""

    exit_signal = None  # the exec API reports 128+N for a signal: no way to tell

    def __init__(self, docker: DockerClient, exec_id: str, stream: ExecStream, *, user: str,
                 pidfile: str | None, runner: Runner,
                 gone: Callable[[str], Awaitable[BackendError | None]] | None = None) -> None:
        self._docker = docker
        self.exec_id = exec_id
        self.stream = stream
        self._user = user
        self._pidfile = pidfile
        self._runner = runner
        self._gone = gone
        self.on_exit: Callable[[], object] | None = None
        self._status: int | None = None
        self._hung_up = False
        self._lost = False  # the engine stopped answering while this process ran

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    def write_eof(self) -> None:
        self.stream.write_eof()

    def buffered(self) -> int:
        return self.stream.buffered()

    async def drain(self) -> None:
        await self.stream.drain()

    async def read(self) -> tuple[int, bytes]:
        return await self.stream.read()

    def close(self) -> None:
        """End our side.  A session whose client went away is ended as sshd would: a pty
        session's shell gets SIGHUP (bash passes it to its jobs), a command's input ends; what
        is still there after HANGUP_GRACE is killed (its process group too).  Processes the
        user detached (setsid, nohup, tmux, screen) are not in that group and survive."""
        # a stream cut by an engine gone away says nothing of the process: it may still run
        lost = self._lost or self.stream.cut
        running = self._status is None and (lost or not self.stream.at_eof())
        self.stream.close()
        if running and self._pidfile is not None and not self._hung_up:
            self._hung_up = True
            background(self._hang_up())

    async def _hang_up(self) -> None:
        """SIGHUP (pty), then SIGKILL of what is left after the grace.  While the engine does
        not answer (its socket was cut under this session) it is tried again until it does,
        for up to HANGUP_RETRY seconds: the process outlived its session's stream."""
        deadline = time.monotonic() + HANGUP_RETRY
        delay = 1.0
        while True:
            try:
                await self._end_leftover()
                return
            except EngineUnreachable as exc:
                if time.monotonic() + delay > deadline:
                    log.warning("could not end the leftover session process of %s: %s",
                                self._user, exc)
                    return
                log.debug("hang-up of exec %s: %s; again in %.0f s", self.exec_id[:12], exc,
                          delay)
            except DockerError as exc:
                log.debug("hang-up of exec %s: %s", self.exec_id[:12], exc)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _end_leftover(self) -> None:
        if (await self._docker.exec_inspect(self.exec_id)).get("Running") and self.stream.tty:
            await self._runner(self._user, ["sh", "-c", LIVE + f'p=$(live_ {self._pidfile}) && '
                                            'kill -s HUP "$p"'])
        await asyncio.sleep(HANGUP_GRACE)
        if (await self._docker.exec_inspect(self.exec_id)).get("Running"):
            await self._runner(self._user, [
                "sh", "-c", LIVE + f'p=$(live_ {self._pidfile}) && {{ kill -s KILL -- "-$p";'
                ' kill -s KILL "$p"; } 2>/dev/null; true'])
            log.info("killed the leftover session process of %s after %.0f s", self._user,
                     HANGUP_GRACE)

    async def resize(self, rows: int, cols: int) -> None:
        try:
            await self._docker.exec_resize(self.exec_id, rows, cols)
        except DockerError as exc:  # the process may have just exited
            log.debug("resize of exec %s failed: %s", self.exec_id[:12], exc)

    async def signal(self, name: str) -> None:
        """A second exec signals the recorded PID.  It runs as the user, so a PID she wrote
        into the file can only ever name her own processes."""
        if name not in SIGNALS or self._pidfile is None:
            return
        try:
            await self._runner(self._user, ["sh", "-c",
                                            LIVE + f'p=$(live_ {self._pidfile}) && '
                                                   f'kill -s {name} "$p"'])
        except DockerError as exc:
            log.debug("signal %s not delivered: %s", name, exc)

    async def wait(self, poll: float = 0.02, timeout: float = 10.0) -> int:
        """Exit code once the engine reports the process gone (after the stream ended)."""
        if self._status is not None:
            return self._status
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await self._docker.exec_inspect(self.exec_id)
            except EngineUnreachable as exc:
                self._lost = True  # close() ends it once the engine answers again
                raise BackendError(
                    "the connection to the container engine was lost, so this session ended;"
                    " your container and files are kept. Please log in again in a minute.",
                    f"exec {self.exec_id[:12]} of {self._user}: engine lost: {exc.message}",
                    "engine-lost") from exc
            except DockerError as exc:
                gone = await self._gone(self._user) if exc.status == 404 and self._gone else None
                if gone is None:
                    raise
                raise gone from exc  # the container went away
            if not info.get("Running") and info.get("ExitCode") is not None:
                status = int(info["ExitCode"])
                if status >= 128 and self._gone is not None:
                    # killed: by her, or with her whole container (removed, stopped, OOM)?
                    # The engine may still call it running for a moment: look again briefly.
                    for pause in (0.0, 0.1, 0.2):
                        await asyncio.sleep(pause)
                        gone = await self._gone(self._user)
                        if gone is not None:
                            raise gone
                if self.on_exit is not None:
                    self.on_exit()
                self._status = status
                return status
            if time.monotonic() > deadline:
                return 255
            await asyncio.sleep(poll)
            poll = min(poll * 2, 0.2)
