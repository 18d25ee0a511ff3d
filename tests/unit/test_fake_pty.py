"""The fake backend's pty output: whole, even when the command wrote and exited before the
first read (a StreamReader raised the pending EIO before its buffer: `ssh -tt devbox tty`
came back empty in 17 of 40 runs under load)."""

from __future__ import annotations

import asyncio
import os
import pty

import uvloop

from gateway.backend.fake import FakeProcess


async def short_command_in_a_pty() -> bytes:
    master, slave = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            "printf", "%s", "every byte", stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True)
    finally:
        os.close(slave)
    await proc.wait()  # written and gone before anyone reads: its output waits in the master
    fake = await FakeProcess.open_pty(proc, master)
    out = bytearray()
    try:
        while True:
            stream, data = await asyncio.wait_for(fake.read(), 10)
            if not stream:
                return bytes(out)
            assert stream == 1
            out += data
    finally:
        fake.close()


async def test_output_of_a_finished_command_is_read_whole() -> None:
    assert await short_command_in_a_pty() == b"every byte"


def test_same_under_uvloop() -> None:
    """uvloop (the gateway's loop) reads a write pipe to notice its peer closing: a write
    transport on the master must not be there to take the output."""
    assert uvloop.run(short_command_in_a_pty()) == b"every byte"


def test_pty_command_under_uvloop_has_its_terminal(tmp_path) -> None:
    """The whole start under uvloop: it runs preexec_fn before making the session and moving
    the slave onto 0, 1, 2 (`TIOCSCTTY` on fd 0 failed there: every pty login of a gateway
    with `backend: fake` said "internal error")."""
    from gateway.backend import Limits
    from gateway.backend.base import ProcessSpec
    from gateway.backend.fake import FakeBackend

    async def run() -> tuple[bytes, int]:
        backend = FakeBackend(tmp_path)
        await backend.ensure("alice", Limits())
        proc = await backend.start(ProcessSpec(
            user="alice", kind="command", tty=True,
            command='tty; [ "$(ps -o sid= -p $$)" -eq $$ ] && echo leader; exit 3'))
        out = bytearray()
        while True:
            stream, data = await asyncio.wait_for(proc.read(), 10)
            if not stream:
                break
            out += data
        status = await proc.wait()
        proc.close()
        return bytes(out), status

    out, status = uvloop.run(run())
    assert out.startswith(b"/dev/pts/") and b"leader" in out and status == 3, (out, status)
