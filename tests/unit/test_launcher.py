"""launcher.py and launcher_prog.py without a container: the real launcher program, run on
this host by the test's Python exactly as her container's python3 runs it (program on stdin,
socket as fd 3), and the gateway's side of it.  Exit statuses and signals, stdin EOF, her
signal dispositions, failures to start, her sessions outliving the launcher; and the
gateway's side against a launcher that lies (any message out of protocol ends it, descriptors
sent back are closed, sessions waiting go through runc).  That a launched session has her
container's user, capabilities and cgroup is tests/test_direct.py's (a real container)."""

from __future__ import annotations

import array
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

import pytest

from gateway.backend.base import BackendError
from gateway.backend.docker.direct import DirectProcess
from gateway.backend.docker.launcher import PROGRAM, LaunchedProcess, Launcher


async def _spawn(argv: list[str], fd3: int, stdin: bytes = b"") -> DirectProcess:
    r, w = os.pipe()
    os.write(w, stdin)
    os.close(w)
    pid = os.posix_spawn(argv[0], argv, dict(os.environ),  # noqa: ASYNC221
                         file_actions=[(os.POSIX_SPAWN_DUP2, r, 0),
                                       (os.POSIX_SPAWN_DUP2, fd3, 3)])
    os.close(r)
    proc = DirectProcess(pid, tty=False)
    await proc.attach(write_fd=-1, read_fds=(), log_fd=-1)
    return proc


async def _real_launcher() -> Launcher:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = await _spawn([sys.executable, "-I", "-S", "-", "dgw-launcher"], theirs.fileno(),
                        PROGRAM)
    theirs.close()
    launcher = Launcher(("cid", "t0"), "alice", proc, ours)
    assert await asyncio.wait_for(asyncio.shield(launcher._ready), 20)
    return launcher


async def _run(launcher: Launcher, script: str, stdin: bytes = b"",
               cwd: str = "/") -> tuple[int, bytes, bytes, LaunchedProcess]:
    proc = await launcher.spawn(["/bin/sh", "-c", script], [f"PATH={os.environ['PATH']}"], cwd)
    assert proc is not None
    proc.write(stdin)
    proc.write_eof()
    out, err = bytearray(), bytearray()
    while True:
        stream, data = await asyncio.wait_for(proc.read(), 20)
        if not stream:
            break
        (out if stream == 1 else err).extend(data)
    status = await asyncio.wait_for(proc.wait(), 20)
    return status, bytes(out), bytes(err), proc


def _in_loop(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


def test_sessions_statuses_and_streams() -> None:
    async def test() -> None:
        launcher = await _real_launcher()
        try:
            status, out, err, _ = await _run(launcher, "cat; echo to-err >&2; exit 3",
                                             b"x" * 300_000)
            assert (status, len(out), err) == (3, 300_000, b"to-err\n")
            status, _, _, proc = await _run(launcher, "kill -TERM $$")
            assert (status, proc.exit_signal) == (143, ("TERM", False))
            # what she gets: default dispositions (Python ignores SIGPIPE and SIGXFSZ), no
            # blocked signals, her own session, the directory asked for
            status, out, _, _ = await _run(
                launcher, "grep -E '^Sig(Ign|Blk):' /proc/self/status; "
                "ps -o sid= -p $$ | tr -d ' '; echo $$; pwd; yes | head -1", cwd="/tmp")
            lines = out.decode().split("\n")
            sig = dict(line.split(":\t") for line in lines[:2])
            sid, pid, cwd, yes = lines[2:6]
            python_ignores = 1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)
            assert int(sig["SigIgn"], 16) & python_ignores == 0, out
            assert sig["SigBlk"] == "0" * 16, out
            assert (sid, cwd, yes) == (pid, "/tmp", "y"), out
            assert launcher.alive
        finally:
            launcher.close()
    _in_loop(test)


def test_signals_and_failures_to_start() -> None:
    async def test() -> None:
        launcher = await _real_launcher()
        try:
            proc = await launcher.spawn(["sleep", "60"], [f"PATH={os.environ['PATH']}"], "/")
            assert proc is not None and proc.running
            await proc.signal("INT")
            assert await asyncio.wait_for(proc.wait(), 20) == 130
            assert proc.exit_signal == ("INT", False)
            assert not proc.send(signal.SIGTERM)  # ended: nothing to signal
            for argv, cwd in ((["no-such-program-here"], "/"), (["true"], "/no/such/dir")):
                with pytest.raises(BackendError) as caught:
                    await launcher.spawn(argv, [f"PATH={os.environ['PATH']}"], cwd)
                assert caught.value.reason == "exec-failed"
            assert launcher.alive  # her mistakes are not the launcher's
        finally:
            launcher.close()
    _in_loop(test)


def test_her_sessions_outlive_the_launcher_and_their_status_is_unknown() -> None:
    async def test() -> None:
        launcher = await _real_launcher()
        proc = await launcher.spawn(["sleep", "60"], [f"PATH={os.environ['PATH']}"], "/")
        assert proc is not None
        os.kill(launcher.pid, signal.SIGKILL)  # she killed it
        with pytest.raises(BackendError) as caught:
            await asyncio.wait_for(proc.wait(), 20)
        assert caught.value.reason == "launcher-lost" and not launcher.alive
        os.kill(proc.pid, 0)  # her sleep still runs
        os.kill(proc.pid, signal.SIGKILL)
        assert await launcher.spawn(["true"], [], "/") is None  # the next goes through runc
    _in_loop(test)


def test_the_launcher_exits_when_the_gateway_closes_its_end() -> None:
    """As when the gateway dies (SIGKILL: no goodbye, only its descriptors closing)."""
    async def test() -> None:
        launcher = await _real_launcher()
        asyncio.get_running_loop().remove_reader(launcher._sock.fileno())
        launcher._sock.close()
        assert await asyncio.wait_for(asyncio.shield(launcher._proc._exited), 20) == 0
    _in_loop(test)


# --- a launcher that lies ------------------------------------------------------------------

async def _fake(answer: Callable[[socket.socket, dict], None]) -> tuple[Launcher, socket.socket]:
    """A Launcher whose other end is this test: `answer` gets each request."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stand_in = await _spawn(["/bin/sleep", "60"], os.open(os.devnull, os.O_RDONLY))
    launcher = Launcher(("cid", "t0"), "mallory", stand_in, ours)
    theirs.send(json.dumps({"op": "ready", "pid": 77}).encode())
    await asyncio.wait_for(asyncio.shield(launcher._ready), 5)

    def readable() -> None:
        data, anc, _, _ = theirs.recvmsg(1 << 20, socket.CMSG_SPACE(64))
        fds = array.array("i")
        for _, _, payload in anc:
            fds.frombytes(payload)
        for fd in fds:
            os.close(fd)
        if data:
            answer(theirs, json.loads(data))

    asyncio.get_running_loop().add_reader(theirs.fileno(), readable)
    return launcher, theirs


LIES: dict[str, Callable[[socket.socket, dict], None]] = {
    "not json": lambda s, m: s.send(b"\xff{"),
    "not an object": lambda s, m: s.send(b"[1, 2]"),
    "unhashable id": lambda s, m: s.send(json.dumps({"op": "started", "id": [1],
                                                      "pid": 5}).encode()),
    "another session": lambda s, m: s.send(json.dumps({"op": "started", "id": m["id"] + 1,
                                                        "pid": 5}).encode()),
    "exit before start": lambda s, m: s.send(json.dumps({"op": "exit", "id": m["id"],
                                                          "status": 0}).encode()),
    "bad pid": lambda s, m: s.send(json.dumps({"op": "started", "id": m["id"],
                                                "pid": -1}).encode()),
    "ready twice": lambda s, m: s.send(json.dumps({"op": "ready", "pid": 78}).encode()),
    "unknown op": lambda s, m: s.send(json.dumps({"op": "sudo", "id": m["id"]}).encode()),
    "a descriptor back": lambda s, m: s.sendmsg(
        [json.dumps({"op": "started", "id": m["id"], "pid": 5}).encode()],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0]))]),
    "too long": lambda s, m: s.send(b" " * 10_000),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_launcher_is_ended_and_the_session_goes_through_runc(lie: str) -> None:
    async def test() -> None:
        launcher, theirs = await _fake(LIES[lie])
        before = set(os.listdir("/proc/self/fd"))
        assert await launcher.spawn(["true"], [], "/") is None
        assert not launcher.alive
        # nothing of the session's or sent back is left open here (the socket was ours too)
        assert set(os.listdir("/proc/self/fd")) <= before
        theirs.close()
    _in_loop(test)


def test_an_honest_answer_from_the_fake_is_taken() -> None:
    """The control for the lies: the same fake, answering by the protocol, is believed."""
    def honest(s: socket.socket, m: dict) -> None:
        if m["op"] == "start":
            s.send(json.dumps({"op": "started", "id": m["id"], "pid": 5}).encode())
            s.send(json.dumps({"op": "exit", "id": m["id"], "status": 2 << 8}).encode())

    async def test() -> None:
        launcher, theirs = await _fake(honest)
        proc = await launcher.spawn(["true"], [], "/")
        assert proc is not None
        proc.close()
        assert await asyncio.wait_for(proc.wait(), 5) == 2
        assert launcher.alive
        launcher.close()
        theirs.close()
    _in_loop(test)


def test_a_silent_launcher_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.backend.docker.launcher.ANSWER_TIMEOUT", 0.3)

    async def test() -> None:
        launcher, theirs = await _fake(lambda s, m: None)
        assert await launcher.spawn(["true"], [], "/") is None
        assert not launcher.alive
        theirs.close()
    _in_loop(test)
