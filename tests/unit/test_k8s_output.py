"""The Kubernetes backend's exec output: framed by the pod helper and ended by its trailer
(exit status and byte counts), acknowledged by the gateway before the helper exits, so that
the end of the exec cannot cut the output off unnoticed (issue 15: about 1 in 40 8 MiB
streams read slowly came back short).  The helper runs here as a local process; the
websocket is a stand-in that replays what the cluster sends."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import select
import struct
import subprocess
import sys
import time

import aiohttp

from gateway.backend.base import ProcessSpec
from gateway.backend.kubernetes.process import (
    KubeProcess,
    frame,
    helper_command,
    run_spec,
)

ME = pwd.getpwuid(os.getuid()).pw_name


def helper(command: str, tty: bool = False) -> subprocess.Popen[bytes]:
    spec = run_spec(ProcessSpec(user=ME, kind="argv", argv=("sh", "-c", command), tty=tty,
                                workdir="/"))
    argv = [sys.executable, *helper_command("run", spec)[1:]]  # python3 in the pod
    return subprocess.Popen(argv, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while data:
        n = struct.unpack(">I", data[1:5])[0]
        out.append((data[:1], data[5:5 + n]))
        data = data[5 + n:]
    return out


def read_until_trailer(proc: subprocess.Popen[bytes], timeout: float = 20) -> bytes:
    assert proc.stdout is not None
    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            assert chunk, (data[-200:], proc.stderr.read() if proc.stderr else b"")
            data += chunk
            if any(kind == b"x" for kind, _ in frames_complete(data)):
                return data
    raise AssertionError(f"no trailer: {data[-200:]!r}")


def frames_complete(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while len(data) >= 5:
        n = struct.unpack(">I", data[1:5])[0]
        if len(data) < 5 + n:
            break
        out.append((data[:1], data[5:5 + n]))
        data = data[5 + n:]
    return out


def test_helper_frames_output_and_waits_for_the_ack() -> None:
    """Stdout and stderr apart, in order, then `x status out err`; the helper stays until
    the gateway's `a` (its exit would let the cluster end the exec)."""
    n = 3 << 20
    proc = helper(f"head -c {n} /dev/zero; echo oops >&2; exit 7")
    assert proc.stdin is not None
    try:
        proc.stdin.write(frame(b"e"))
        proc.stdin.flush()
        got = frames(read_until_trailer(proc))
        time.sleep(0.3)
        assert proc.poll() is None, "the helper exited before the ack"
        proc.stdin.write(frame(b"a"))
        proc.stdin.flush()
        assert proc.wait(10) == 7
    finally:
        proc.kill()
        proc.wait()
    assert got[0] == (b"b", b"")
    assert b"".join(p for k, p in got if k == b"o") == bytes(n)
    assert b"".join(p for k, p in got if k == b"r") == b"oops\n"
    assert got[-1] == (b"x", f"7 {n} 5".encode())


def test_helper_in_a_pty_frames_output_and_ends_on_stdin_eof() -> None:
    """A pty session's output is framed too; a gateway that went away (stdin EOF) instead of
    acknowledging does not keep the helper."""
    proc = helper("tty >/dev/null && echo in-a-pty; exit 3", tty=True)
    assert proc.stdin is not None
    try:
        got = frames(read_until_trailer(proc))
        proc.stdin.close()
        assert proc.wait(10) == 3
    finally:
        proc.kill()
        proc.wait()
    assert b"".join(p for k, p in got if k == b"o").replace(b"\r", b"") == b"in-a-pty\n"
    assert got[-1][0] == b"x" and got[-1][1].startswith(b"3 ")


class FakeWebSocket:
    """What the exec websocket delivers: channel-prefixed binary messages, then a close."""

    def __init__(self, messages: list[bytes]) -> None:
        self.incoming = list(messages)
        self.sent: list[bytes] = []
        self.closed = False

    async def receive(self) -> aiohttp.WSMessage:
        await asyncio.sleep(0)
        if self.incoming:
            return aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, self.incoming.pop(0), None)
        return aiohttp.WSMessage(aiohttp.WSMsgType.CLOSE, 1000, "")

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self) -> None:
        self.closed = True

    def exception(self) -> BaseException | None:
        return None


def exec_messages(body: bytes, split: int = 7) -> list[bytes]:
    """The helper's framed output as the cluster may chunk it, on channel 1."""
    return [b"\x01" + body[i:i + split] for i in range(0, len(body), split)]


async def drain(proc: KubeProcess) -> tuple[bytes, bytes, int]:
    out, err = bytearray(), bytearray()
    while True:
        stream, data = await proc.read()
        if not stream:
            break
        (out if stream == 1 else err).extend(data)
    status = await proc.wait()
    await asyncio.sleep(0.01)  # the sender task sends the ack
    return bytes(out), bytes(err), status


async def test_complete_output_is_acknowledged() -> None:
    body = (frame(b"b") + frame(b"o", b"hello ") + frame(b"r", b"warn") +
            frame(b"o", b"world") + frame(b"x", b"7 11 4"))
    status = json.dumps({"status": "Failure", "details": {"causes": [
        {"reason": "ExitCode", "message": "7"}]}}).encode()
    ws = FakeWebSocket([*exec_messages(body), b"\x03" + status])
    proc = KubeProcess(ws)  # type: ignore[arg-type]
    try:
        out, err, code = await drain(proc)
    finally:
        proc.close()
    assert (out, err, code) == (b"hello world", b"warn", 7)
    assert b"\x00" + frame(b"a") in ws.sent


async def test_cut_output_fails_loudly() -> None:
    """The exec ends (status channel, close) before the trailer: the session must not look
    complete: a notice on stderr and status 255, whatever the exec's own status said."""
    body = frame(b"b") + frame(b"o", b"x" * 1000) + frame(b"o", b"y" * 1000)[:500]
    ws = FakeWebSocket([*exec_messages(body, 300),
                        b'\x03{"status":"Success","metadata":{}}'])
    proc = KubeProcess(ws)  # type: ignore[arg-type]
    try:
        out, err, code = await drain(proc)
    finally:
        proc.close()
    assert out == b"x" * 1000 and code == 255
    assert b"cut short" in err and b"1000 bytes of stdout" in err
    assert b"\x00" + frame(b"a") not in ws.sent


async def test_counts_that_disagree_fail_loudly() -> None:
    body = frame(b"b") + frame(b"o", b"abc") + frame(b"x", b"0 4 0")
    ws = FakeWebSocket(exec_messages(body))
    proc = KubeProcess(ws)  # type: ignore[arg-type]
    try:
        out, err, code = await drain(proc)
    finally:
        proc.close()
    assert out == b"abc" and code == 255 and b"cut short" in err


async def test_a_helper_that_could_not_start_keeps_its_own_words_and_status() -> None:
    """Before `b` (no such user, no python3 …): its stderr and the exec's status as they are,
    no cut-short notice."""
    status = json.dumps({"status": "Failure", "details": {"causes": [
        {"reason": "ExitCode", "message": "1"}]}}).encode()
    ws = FakeWebSocket([b"\x02KeyError: 'getpwnam(): name not found'", b"\x03" + status])
    proc = KubeProcess(ws)  # type: ignore[arg-type]
    try:
        out, err, code = await drain(proc)
    finally:
        proc.close()
    assert (out, code) == (b"", 1) and b"getpwnam" in err and b"cut short" not in err
