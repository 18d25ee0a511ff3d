"""A session's process as a Kubernetes exec: `pod_helper` in the pod, framed input.

The exec itself is always without a tty (stdout and stderr apart); the helper makes the
pty when the session wants one.  Input, end of input, signals and window sizes travel as
frames on the exec's stdin channel (see pod_helper); the exit status comes from the status
channel (3) when the helper exits with the program's status.
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


class KubeProcess:
    """`Process` over one exec websocket (see backend.base.Process)."""

    exit_signal = None  # the exec status reports 128+N for a signal: no way to tell

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, tty: bool = False) -> None:
        self.ws = ws
        self.tty = tty
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
        if self._closed or self._ended.is_set():
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
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY and msg.data:
                channel, data = msg.data[0], msg.data[1:]
                if channel in (1, 2) and data:
                    return channel, data
                if channel == 3 and data:
                    try:
                        self._status = exit_code(json.loads(data))
                    except ValueError:
                        self._status = 255
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                              aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                self._end()
        return 0, b""

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
