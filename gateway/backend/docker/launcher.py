"""Her non-terminal sessions forked in her container by one launcher, not each by `runc exec`.

Every `runc exec` starts a Go runtime and joins the container anew: ~40 ms of CPU and a
resident runc (~1.7 MiB) for as long as the session is open.  Under a burst of logins (100
sessions at once) that CPU is most of the gateway's wait, and 100 open IDE or agent sessions
keep 100 runc processes.  So once per container start the gateway starts one process through
runc as a session would be started (launcher_prog.py, her uid, gid and groups and everything
of the container's), and later non-terminal sessions are forked by it: they inherit exactly
that, and cost a fork and an exec.  Terminal sessions keep runc (it makes her terminal), and
so does everything while no launcher answers (her image has no python3, it was killed, the
container was just started): then sessions start as before, nothing is lost.

The launcher is her process: she can kill it, trace it or replace the python3 it runs on.  So
the gateway takes from it only what concerns her own sessions, and ends it at the first thing
that is not that: a message that is not one of the protocol's, an answer about a session it
was not asked for, a descriptor sent back, no answer in time.  What a session's process is
made of (user, capabilities, cgroup, limits) never comes from the launcher's word: it is what
runc gave the launcher, inherited (tests/test_direct.py checks it).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import signal as signals
import socket
from pathlib import Path
from typing import Any

from ..base import BackendError
from .direct import DirectExec, DirectProcess, Identity, grow_pipe

log = logging.getLogger("dind_gateway.backend")

PROGRAM = (Path(__file__).with_name("launcher_prog.py")).read_bytes()
# sh finds her python3 on the container's PATH (without one it exits 127: no launcher then);
# the program comes on stdin, so her `ps` shows `python3 -I -S - dgw-launcher`
ARGV = ["/bin/sh", "-c", 'command -v python3 >/dev/null 2>&1 || exit 127; '
        'exec python3 -I -S - dgw-launcher']
READY_TIMEOUT = 10.0  # its Python starting up in her container (a busy one: seconds)
ANSWER_TIMEOUT = 10.0  # a fork and an exec: milliseconds
MAX_REQUEST = 128 * 1024  # a bigger request (a huge command) goes through runc
_MAX_ANSWER = 4096


class LaunchedProcess(DirectProcess):
    """A session forked by the launcher: `Process` over her pipes, ended by its report."""

    def __init__(self, launcher: Launcher, sid: int) -> None:
        super().__init__(0, tty=False, exits=None, child=False)
        self._launcher = launcher
        self.sid = sid
        self.answer: asyncio.Future[dict[str, Any] | None] = (
            asyncio.get_running_loop().create_future())
        self.lost = False  # the launcher ended while this ran: its status is unknown

    def send(self, sig: signals.Signals) -> bool:
        if self._status is not None:
            return False
        return self._launcher.kill(self.sid, sig)

    def ended(self, raw: int | None) -> None:
        """Its wait status from the launcher, or None: the launcher is gone."""
        if self._status is not None:
            return
        if raw is None:
            self.lost, self._status = True, 255
        elif raw & 0x7F == 0:  # exited (the launcher's word: only ever her own status)
            self._status = (raw >> 8) & 0xFF
        elif os.WIFSIGNALED(raw):
            self._status = 128 + os.WTERMSIG(raw)
            with contextlib.suppress(ValueError):
                self.exit_signal = (signals.Signals(os.WTERMSIG(raw)).name[3:],
                                    os.WCOREDUMP(raw))
        else:
            self._status = 255
        if not self._exited.done():
            self._exited.set_result(self._status)

    async def wait(self) -> int:
        status = await super().wait()
        if self.lost:
            raise BackendError("the session launcher in your container was stopped, so this "
                               "command's exit status is unknown",
                               "session launcher gone while a session ran", "launcher-lost")
        return status


class Launcher:
    """One launcher (one container start of hers) and its socket."""

    def __init__(self, key: tuple[str, str], user: str, proc: DirectProcess,
                 sock: socket.socket) -> None:
        self.key = key  # (container id, start time): the container start it belongs to
        self.user = user
        self._proc = proc  # the runc that started it: our child
        self._sock = sock
        self._pending: dict[int, LaunchedProcess] = {}
        self._next = 1
        self.alive = True
        self.pid = 0  # in her container's pid namespace
        self._ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    @classmethod
    async def start(cls, direct: DirectExec, key: tuple[str, str], user: str,
                    base: dict[str, Any], who: Identity) -> Launcher | None:
        """Started and answering, or None (logged): her sessions go through runc then."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await direct.start_with_socket(key[0], base, who, ARGV, theirs.fileno(),
                                                   PROGRAM)
        except OSError as exc:
            ours.close()
            log.warning("no session launcher for %s: %s", user, exc)
            return None
        finally:
            theirs.close()
        launcher = cls(key, user, proc, ours)
        try:
            ok = await asyncio.wait_for(asyncio.shield(launcher._ready), READY_TIMEOUT)
        except TimeoutError:
            ok = False
            launcher.close(f"not ready within {READY_TIMEOUT:.0f} s")
        if not ok:
            status = None
            with contextlib.suppress(TimeoutError):  # its end and its runc's are two events
                status = await asyncio.wait_for(asyncio.shield(proc._exited), 2)
            why = "no python3 in her container" if status == 127 else f"exit status {status}"
            log.info("no session launcher for %s (%s): her sessions start through runc",
                     user, why if status is not None else "it did not answer")
            return None
        log.info("session launcher of %s ready (pid %d in her container)", user, launcher.pid)
        return launcher

    # --- sessions ---------------------------------------------------------------------------

    async def spawn(self, argv: list[str], env: list[str], cwd: str) -> LaunchedProcess | None:
        """Her session's process, started; None if this one must go through runc (too big a
        request, the launcher gone or not answering).  Her command failing to start (no
        such directory, an argument list too long) is a BackendError, as through runc."""
        if not self.alive:
            return None
        sid = self._next
        self._next += 1
        request = json.dumps({"op": "start", "id": sid, "argv": argv, "env": env,
                              "cwd": cwd}).encode()
        if len(request) > MAX_REQUEST:
            return None
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (in_w, out_w):
            grow_pipe(fd)
        proc = LaunchedProcess(self, sid)
        self._pending[sid] = proc
        ours = [in_w, out_r, err_r]
        try:
            self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [in_r, out_w, err_w]))])
        except OSError as exc:  # full (EAGAIN) or gone: this one goes through runc
            self._pending.pop(sid, None)
            for fd in ours:
                os.close(fd)
            if not isinstance(exc, BlockingIOError):
                self.close(f"send failed: {exc}")
            return None
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        try:
            answer = await asyncio.wait_for(asyncio.shield(proc.answer), ANSWER_TIMEOUT)
        except TimeoutError:
            answer = None
            self.close(f"no answer to a start within {ANSWER_TIMEOUT:.0f} s")
        if answer is None or answer["op"] == "failed":
            for fd in ours:
                os.close(fd)
            if answer is None:
                return None
            text = str(answer.get("error", ""))[:300]
            if answer.get("errno") == 7:  # E2BIG: what a shell would say
                raise BackendError("sh: Argument list too long", f"launcher: {text}",
                                   "exec-failed")
            raise BackendError("your session could not be started in your container; try "
                               "again", f"launcher: {text}", "exec-failed")
        proc.pid = answer["pid"]
        await proc.attach(write_fd=in_w, read_fds=((1, out_r), (2, err_r)), log_fd=-1)
        return proc

    def kill(self, sid: int, sig: signals.Signals) -> bool:
        if not self.alive or sid not in self._pending:
            return False
        with contextlib.suppress(OSError):
            self._sock.send(json.dumps({"op": "kill", "id": sid, "sig": int(sig)}).encode())
            return True
        return False

    # --- what it says -----------------------------------------------------------------------

    def _readable(self) -> None:
        while self.alive:
            fds = array.array("i")
            try:
                data, anc, flags, _ = self._sock.recvmsg(
                    _MAX_ANSWER, socket.CMSG_SPACE(4 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(f"receive failed: {exc}")
                return
            sent_fds = False
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    sent_fds = True
            for fd in fds:
                os.close(fd)
            if not data and not anc:
                self.close("it ended")
                return
            if sent_fds or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                self.close("a message out of protocol (descriptors, or too long)")
                return
            why = self._take(data)
            if why:
                self.close(why)
                return

    def _take(self, data: bytes) -> str:
        """One message from the launcher; what was wrong with it ("" if nothing)."""
        try:
            msg = json.loads(data)
        except ValueError:
            return "a message that is not JSON"
        if not isinstance(msg, dict):
            return "a message that is not an object"
        op = msg.get("op")
        if op == "ready" and not self._ready.done() and _is_pid(msg.get("pid")):
            self.pid = msg["pid"]
            self._ready.set_result(True)
            return ""
        sid = msg.get("id")
        proc = self._pending.get(sid) if isinstance(sid, int) else None
        if proc is None or not self._ready.done():
            return f"a message about no session of ours ({op!r})"
        if op == "started" and not proc.answer.done() and _is_pid(msg.get("pid")):
            proc.answer.set_result(msg)
            return ""
        if op == "failed" and not proc.answer.done():
            self._pending.pop(proc.sid)
            proc.answer.set_result({"op": "failed", "errno": msg.get("errno"),
                                    "error": msg.get("error")})
            return ""
        if op == "exit" and proc.answer.done() and isinstance(msg.get("status"), int) \
                and 0 <= msg["status"] <= 0xFFFF:
            self._pending.pop(proc.sid)
            proc.ended(msg["status"])
            return ""
        return f"a message out of protocol ({op!r})"

    def close(self, why: str = "closed") -> None:
        """Ends it (its socket closes: it exits; her sessions keep running, their statuses
        unknown) and every session still waiting for an answer goes through runc."""
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        if why != "closed":
            log.info("session launcher of %s ended: %s", self.user, why)
        if not self._ready.done():
            self._ready.set_result(False)
        for proc in self._pending.values():
            if not proc.answer.done():
                proc.answer.set_result(None)
            else:
                proc.ended(None)
        self._pending.clear()
        if self._proc.running and why != "it ended":
            self._proc.send(signals.SIGTERM)  # runc passes it on
        self._proc.close()


def _is_pid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 22
