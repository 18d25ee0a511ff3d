"""A session's process as a Kubernetes exec: `pod_helper` in the pod, framed input.

The exec itself is always without a tty; the helper makes the pty when the session wants
one.  Input, end of input, signals and window sizes travel as frames on the exec's stdin
channel (see pod_helper).  Output comes back framed on the exec's stdout: the program's
stdout and stderr, then its exit status with the byte counts, which the gateway acknowledges
before the helper exits.  The end of the exec (its status channel, the websocket's close)
then never races the output: Kubernetes' own end of an exec was seen to lose the tail of a
stream held back by a full SSH window.  An exec that ends without that trailer was cut
short, and the session says so and fails instead of looking complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from pathlib import Path

import aiohttp

from ...aio import background
from ..base import ProcessSpec

log = logging.getLogger("dind_gateway.backend")

HELPER = (Path(__file__).parent / "pod_helper.py").read_text()
SFTP_SERVER = "/usr/libexec/sftp-server"
SIGNALS = {"ABRT", "ALRM", "FPE", "HUP", "ILL", "INT", "KILL", "PIPE", "QUIT", "SEGV", "TERM",
           "USR1", "USR2"}
HIGH_WATER = 256 * 1024  # input bytes waiting before drain() blocks
CHUNK = 64 * 1024

# The user's shell, as sshd starts it: a login shell, or `shell -c command`.
WRAPPER = r"""
sh_=${DGW_SHELL:-/bin/bash}
[ -x "$sh_" ] || sh_=/bin/bash
[ -x "$sh_" ] || sh_=/bin/sh
unset DGW_SHELL
export SHELL="$sh_"
cd "$HOME" 2>/dev/null
[ $# -eq 0 ] && exec "$sh_" -l
exec "$sh_" -c "$1"
"""


def helper_command(mode: str, spec: dict[str, object]) -> list[str]:
    return ["python3", "-I", "-c", HELPER, mode, json.dumps(spec, separators=(",", ":"))]


def run_spec(spec: ProcessSpec) -> dict[str, object]:
    """What the helper runs for `spec` (argv, environment, tty, size, directory)."""
    env = dict(spec.env)
    if spec.kind == "argv":
        argv = list(spec.argv)
    elif spec.kind == "sftp":
        argv = [SFTP_SERVER]
    else:
        if spec.shell:
            env["DGW_SHELL"] = spec.shell
        argv = ["/bin/sh", "-c", WRAPPER, "dgw"]
        if spec.kind == "command":
            argv.append(spec.command)
    return {"user": spec.user, "argv": argv, "env": env, "tty": spec.tty,
            "cols": spec.size[0], "rows": spec.size[1], "workdir": spec.workdir}


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def exit_code(status: dict) -> int:
    """The exec's status message (channel 3) as an exit status."""
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message"))
            except (TypeError, ValueError):
                break
    log.warning("exec ended without an exit code: %s", status.get("message"))
    return 255


def cut_notice(got: dict[int, int]) -> bytes:
    """What she reads when her command's output did not arrive complete."""
    return (f"dind-gateway: the output of this command was cut short on its way from your "
            f"environment (only {got[1]} bytes of stdout and {got[2]} of stderr arrived, and "
            f"its exit status is unknown); please run it again.\n").encode()


class KubeProcess:
    """`Process` over one exec websocket (see backend.base.Process)."""

    exit_signal = None  # the helper reports 128+N for a signal, as runc does

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, tty: bool = False) -> None:
        self.ws = ws
        self.tty = tty
        self._frames = bytearray()  # the helper's framed output, not parsed yet
        self._got = {1: 0, 2: 0}
        self._begun = False  # the helper started the program (its `b` frame)
        self._exec_status: int | None = None  # from the status channel: the helper's own
        self._notice = b""
        self._out: list[bytes] = []
        self._queued = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._status: int | None = None
        self._ended = asyncio.Event()
        self._closed = False
        self._sender = asyncio.get_running_loop().create_task(self._send())

    # --- input ------------------------------------------------------------------------------

    def _queue(self, data: bytes, counted: int = 0) -> None:
        # after the trailer her program is gone: input sent then would only reach an exec
        # that may have ended, whose side of the connection answers it with a reset
        if self._closed or self._ended.is_set() or self._status is not None:
            return
        self._out.append(data)
        self._queued += counted
        if self._queued >= HIGH_WATER:
            self._drained.clear()
        self._wake.set()

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            part = data[i:i + CHUNK]
            self._queue(frame(b"d", part), len(part))

    def write_eof(self) -> None:
        self._queue(frame(b"e"))

    def buffered(self) -> int:
        return self._queued

    async def drain(self) -> None:
        await self._drained.wait()

    async def _send(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._out:
                    batch, size = [], 0
                    while self._out and size < CHUNK:
                        batch.append(self._out.pop(0))
                        size += len(batch[-1])
                    msg = b"".join(batch)
                    await self.ws.send_bytes(b"\x00" + msg)
                    self._queued = max(0, self._queued - size)
                    if self._queued < HIGH_WATER // 2:
                        self._drained.set()
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            log.debug("exec input ended: %s", exc)
        finally:
            self._drained.set()

    # --- output and status ------------------------------------------------------------------

    async def read(self) -> tuple[int, bytes]:
        while not self._ended.is_set():
            item = self._next_frame()
            if item is not None:
                return item
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data:
                channel, data = msg.data[0], msg.data[1:]
                if channel == 1:
                    self._frames += data
                elif channel == 2 and data:  # the helper's own words: it could not start
                    return 2, data
                elif channel == 3 and data:
                    try:
                        self._exec_status = exit_code(json.loads(data))
                    except ValueError:
                        self._exec_status = 255
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                self._finish(msg)
                if self._notice:
                    notice, self._notice = self._notice, b""
                    return 2, notice
        return 0, b""

    def _next_frame(self) -> tuple[int, bytes] | None:
        """The next output frame of the helper's, or None when more is needed."""
        buf = self._frames
        while len(buf) >= 5:
            n = int.from_bytes(buf[1:5], "big")
            if len(buf) < 5 + n:
                return None
            kind, payload = buf[0], bytes(buf[5:5 + n])
            del buf[:5 + n]
            if kind in (0x6F, 0x72) and payload:  # o, r: her program's stdout, stderr
                channel = 1 if kind == 0x6F else 2
                self._got[channel] += len(payload)
                return channel, payload
            if kind == 0x62:  # b: begun
                self._begun = True
            elif kind == 0x78 and self._status is None and not self._trailer(payload):
                self._status = 255  # x: "status stdout-bytes stderr-bytes", and it disagreed
                self._end()
                return 2, cut_notice(self._got)
        return None

    def _trailer(self, payload: bytes) -> bool:
        """The exit status, when the counts say that every byte arrived."""
        try:
            code, out, err = (int(f) for f in payload.split())
        except ValueError:
            log.warning("exec trailer unreadable: %r", payload[:100])
            return False
        if (out, err) != (self._got[1], self._got[2]):
            log.warning("exec output incomplete: the helper sent %d+%d bytes, %d+%d arrived",
                        out, err, self._got[1], self._got[2])
            return False
        self._queue(frame(b"a"))  # the helper exits once it knows all of it arrived
        self._status = code
        return True

    def _finish(self, msg: aiohttp.WSMessage) -> None:
        """The exec's websocket ended: complete only with the helper's trailer."""
        if self._status is None and self._begun and not self._closed:
            log.warning("exec output cut short: %s of stdout/stderr arrived, no trailer; "
                        "%d bytes unparsed; exec status %s; websocket %s %r %r",
                        self._got, len(self._frames), self._exec_status, msg.type, msg.data,
                        self.ws.exception())
            self._notice = cut_notice(self._got)
            self._status = 255
        elif self._status is None:  # the helper did not start (or we left): its own status
            self._status = self._exec_status
        self._end()

    def _end(self) -> None:
        self._ended.set()
        self._sender.cancel()
        self._drained.set()

    async def wait(self) -> int:
        if not self._ended.is_set():
            while (await self.read())[0]:
                pass  # output nobody reads any more
        return self._status if self._status is not None else 255

    # --- control ----------------------------------------------------------------------------

    async def resize(self, rows: int, cols: int) -> None:
        if self.tty:
            self._queue(frame(b"w", f"{rows} {cols}".encode()))

    async def signal(self, name: str) -> None:
        if name in SIGNALS:
            self._queue(frame(b"s", name.encode()))

    def close(self) -> None:
        """Ends the exec's stdin for real: the helper hangs up / ends input, then kills what
        is left after its grace period (as sshd does for a lost client)."""
        if self._closed:
            return
        self._closed = True
        self._sender.cancel()
        if not self.ws.closed:
            background(self.ws.close())
        self._ended.set()
