"""The backend contract seen from an SSH client: one suite, every backend.

Shell, exec, exit codes, stdout/stderr, stdin EOF, environment, pty + resize, signals, sftp and
scp, `ssh -L`, first-contact flow control, max_sessions.  Docker-only behaviour (isolation,
networks, cgroups, spares, quotas) is tested in tests/test_*.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time

import asyncssh
import pexpect
import pytest

from ..conftest import free_port, wait_for
from .conftest import InProcessGateway


def test_exec_output_and_exit_status(live: InProcessGateway) -> None:
    first = live.ssh("alice", "true")  # first contact: the start's progress line on stderr
    assert first.returncode == 0 and b"ready in" in first.stderr, first.stderr
    r = live.ssh("alice", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n"), r.stderr


def test_stdin_to_eof_arrives_whole(live: InProcessGateway) -> None:
    data = os.urandom(3 * 2**20)
    r = live.ssh("alice", "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_session_environment(live: InProcessGateway) -> None:
    r = live.ssh("alice", 'echo "$USER|$LOGNAME|$SSH_CONNECTION|${LANG-unset}|${FOO-unset}"',
                 opts=("-o", "SendEnv=LANG FOO"))
    user, logname, conn, lang, foo = r.stdout.decode().strip().split("|")
    assert (user, logname, foo) == ("alice", "alice", "unset"), r.stdout
    assert conn.split()[0] == "127.0.0.1" and conn.split()[3] == str(live.port)
    assert lang == os.environ.get("LANG", "unset")


def test_pty_shell_and_resize(live: InProcessGateway) -> None:
    child = pexpect.spawn(" ".join(live.ssh_args("alice", None, "-tt")), timeout=60,
                          dimensions=(30, 100))
    try:
        child.sendline("stty size; tty")
        child.expect(r"30 100\r\n/dev/pts/\d+")
        child.setwinsize(40, 120)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            child.sendline("stty size")
            if child.expect([r"40 120", pexpect.TIMEOUT], timeout=2) == 0:
                break
        else:
            pytest.fail("resize never reached the process")
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5


def test_signal_reaches_the_process(live: InProcessGateway) -> None:
    async def run() -> tuple[str, int | None]:
        async with asyncssh.connect(
                "127.0.0.1", live.port, username="alice", client_keys=[str(live.keys["alice"])],
                known_hosts=None) as conn:
            proc = await conn.create_process(
                "trap 'echo got-TERM; exit 7' TERM; echo ready; "
                "while :; do sleep 0.1; done")
            assert (await proc.stdout.readline()).strip() == "ready"
            proc.send_signal("TERM")
            out = await asyncio.wait_for(proc.stdout.read(), 30)
            await proc.wait_closed()
            return out, proc.exit_status

    out, status = asyncio.run(run())
    assert "got-TERM" in out and status == 7, (out, status)


def test_killed_by_a_signal_ends_as_with_sshd(live: InProcessGateway) -> None:
    """A process killed by a signal ends with `exit-signal`, as under sshd (OpenSSH's `ssh`
    then exits 255), with and without a pty; `exit 143` stays exit status 143.  Kubernetes'
    exec API reports 128+N either way (said in the README): there, both are 143."""
    by_signal = 143 if live.kind == "kubernetes" else 255
    r = live.ssh("alice", "echo before; kill -TERM $$")
    assert (r.returncode, r.stdout) == (by_signal, b"before\n"), r.stderr
    r = live.ssh("alice", "kill -KILL $$", opts=("-tt",))
    assert r.returncode == (137 if live.kind == "kubernetes" else 255), r.stderr
    r = live.ssh("alice", "exit 143")
    assert r.returncode == 143, r.stderr

    async def run() -> tuple[object, object]:
        async with asyncssh.connect(
                "127.0.0.1", live.port, username="alice", client_keys=[str(live.keys["alice"])],
                known_hosts=None) as conn:
            done = await conn.run("kill -TERM $$")
            return done.exit_status, done.exit_signal

    status, signalled = asyncio.run(run())
    if live.kind == "kubernetes":
        assert (status, signalled) == (143, None)
    else:
        assert status == -1 and signalled is not None and signalled[:2] == ("TERM", False), \
            (status, signalled)


def test_sftp_and_scp_round_trip(live: InProcessGateway, tmp_path) -> None:
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(5 * 2**20 + 17))
    base = [a for a in live.ssh_args("alice")[1:-1]]  # options without "ssh" and the host
    port_opts = ["-P" if a == "-p" else a for a in base]
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} conf-sftp.bin\nget conf-sftp.bin {tmp_path / 'down.bin'}\n")
    r = subprocess.run(["sftp", *port_opts, "-b", str(batch), "alice@127.0.0.1"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "down.bin").read_bytes() == src.read_bytes()
    r = subprocess.run(["scp", *port_opts, str(src), "alice@127.0.0.1:conf-scp.bin"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["scp", *port_opts, "alice@127.0.0.1:conf-scp.bin",
                        str(tmp_path / "scp-down.bin")], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "scp-down.bin").read_bytes() == src.read_bytes()
    r = subprocess.run(["sftp", *port_opts, "-b", "-", "alice@127.0.0.1"],
                       input=b"get /nonexistent/file x\n", capture_output=True, timeout=60)
    assert r.returncode != 0 and b"not found" in r.stderr.lower(), r.stderr


ECHO_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(4); print('listening', flush=True)\n"
    "c,_=s.accept(); c.sendall(c.recv(100).upper()); c.close()\n")


def test_local_forward_reaches_own_environment_only(live: InProcessGateway) -> None:
    port = free_port()
    server = subprocess.Popen(live.ssh_args("alice") + [f"python3 -c \"{ECHO_SERVER}\" {port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == b"listening"
        local = free_port()
        tunnel = subprocess.Popen(
            live.ssh_args("alice", None, "-N", "-L", f"127.0.0.1:{local}:localhost:{port}",
                          "-o", "ExitOnForwardFailure=yes"), stderr=subprocess.PIPE)
        try:
            def answer() -> bytes | None:
                try:
                    with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
                        s.sendall(b"ping")
                        return s.recv(100) or None
                except OSError:
                    return None
            got: list[bytes | None] = []
            assert wait_for(lambda: got.append(answer()) or got[-1] is not None, 60), got
            assert got[-1] == b"PING"
        finally:
            tunnel.terminate()
            tunnel.wait(10)
    finally:
        server.kill()
        server.wait(10)

    async def elsewhere() -> str:
        async with asyncssh.connect(
                "127.0.0.1", live.port, username="alice", client_keys=[str(live.keys["alice"])],
                known_hosts=None) as conn:
            with pytest.raises(asyncssh.ChannelOpenError) as info:
                await conn.open_connection("10.9.9.9", 80)
            return info.value.reason

    assert "is not allowed" in asyncio.run(elsewhere())


def test_first_contact_input_waits_in_the_ssh_window(live: InProcessGateway) -> None:
    """While her environment starts, an upload is held by the SSH window (not queued in the
    gateway without bound), and arrives whole once it is ready."""
    if live.kind != "fake":
        pytest.skip("a start that waits on the test is a fake-backend hook; Docker's slow "
                    "first contact is tested in tests/test_transfer.py")
    backend = live.app.backend
    live.call(lambda: backend.stop("carol"))
    gate = backend.hold("carol")
    size = 64 * 2**20
    proc = subprocess.Popen(live.ssh_args("carol") + ["cat > first.bin; wc -c < first.bin"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sent = [0]

    def feed() -> None:
        chunk = b"x" * 2**16
        try:
            while sent[0] < size:
                proc.stdin.write(chunk)
                sent[0] += len(chunk)
            proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    # the client stops being able to write once windows and socket buffers are full
    assert wait_for(lambda: len(set(_samples(sent, 5, 0.2))) == 1, 30)
    held = sent[0]
    assert held < 24 * 2**20, f"{held} bytes accepted while the environment was starting"
    live.soon(gate.set)
    writer.join(120)  # the rest flows once the process exists; then the feeder closes stdin
    assert not writer.is_alive() and sent[0] == size
    out, err = proc.stdout.read(), proc.stderr.read()  # small: the count and one line
    assert proc.wait(120) == 0, err
    assert int(out) == size


def _samples(counter: list[int], n: int, interval: float) -> list[int]:
    out = []
    for _ in range(n):
        out.append(counter[0])
        time.sleep(interval)
    return out


def test_max_sessions_holds_under_a_burst(live: InProcessGateway, tmp_path) -> None:
    """Fifteen channels opened at once over one connection: no more than max_sessions run."""
    limit = 10

    async def burst() -> tuple[int, int]:
        async with asyncssh.connect(
                "127.0.0.1", live.port, username="dave", client_keys=[str(live.keys["dave"])],
                known_hosts=None) as conn:
            async def one() -> bool:
                try:
                    proc = await conn.create_process("echo up; read line")
                except asyncssh.ChannelOpenError:
                    return False
                await proc.stdout.readline()
                return True
            results = await asyncio.gather(*(one() for _ in range(15)))
            return sum(results), len(results) - sum(results)

    ran, refused = asyncio.run(burst())
    assert ran == limit and refused == 5, (ran, refused)
    import json
    audit = live.dir / "state" / "audit.log"
    events = [e for e in map(json.loads, audit.read_text().splitlines())
              if e["event"] == "session.refused" and e["user"] == "dave"]
    assert len(events) == 5 and events[0]["reason"] == "max_sessions 10 reached", events


def test_git_protocol_is_accepted(live: InProcessGateway) -> None:
    """git sets GIT_PROTOCOL=version=2 over ssh; without it git falls back to protocol v0."""
    r = live.ssh("alice", 'echo "${GIT_PROTOCOL-unset}|${GIT_DIR-unset}"',
                 opts=("-o", "SetEnv=GIT_PROTOCOL=version=2 GIT_DIR=/etc"))
    assert r.stdout == b"version=2|unset\n", (r.stdout, r.stderr)


def test_refusals_are_audited(live: InProcessGateway) -> None:
    """A refused -R and a refused forward leave an audit event each, with the reason."""
    audit = live.dir / "state" / "audit.log"
    r = live.ssh("bob", "true", opts=("-o", "ExitOnForwardFailure=yes", "-R", "80:localhost:22"))
    assert r.returncode != 0, r.stderr

    async def elsewhere() -> None:
        async with asyncssh.connect(
                "127.0.0.1", live.port, username="bob", client_keys=[str(live.keys["bob"])],
                known_hosts=None) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("10.9.9.9", 81)

    asyncio.run(elsewhere())

    def refused() -> list[dict]:
        import json
        return [e for e in map(json.loads, audit.read_text().splitlines())
                if e["event"] == "forward.refused" and e.get("user") == "bob"]

    assert wait_for(lambda: len(refused()) >= 2, 10), refused()
    kinds = {(e.get("direction", "local"), e["port"], e["reason"]) for e in refused()}
    assert ("remote", 80, "ports below 1024 are privileged") in kinds, kinds
    assert any(k[:2] == ("local", 81) for k in kinds), kinds


def _serve_http_on_loopback(live: InProcessGateway, user: str, port: int) -> subprocess.Popen:
    """`python3 -m http.server --bind 127.0.0.1` in her environment, started and listening."""
    server = subprocess.Popen(
        live.ssh_args(user) + [f"mkdir -p www && echo hello-{user} > www/index.html && "
                               f"exec python3 -u -m http.server --bind 127.0.0.1 -d www {port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert server.stdout is not None
    seen = [server.stdout.readline() for _ in range(1)]
    while b"Serving HTTP" not in seen[-1] and seen[-1] and len(seen) < 5:
        seen.append(server.stdout.readline())  # the first contact's progress line comes first
    assert b"Serving HTTP" in seen[-1], seen
    return server


def test_forwards_reach_her_loopback(live: InProcessGateway) -> None:
    """What IDEs do: a server bound to 127.0.0.1 in the environment, reached with -L and -D."""
    port = free_port()
    server = _serve_http_on_loopback(live, "erin", port)
    try:
        local, socks = free_port(), free_port()
        tunnel = subprocess.Popen(
            live.ssh_args("erin", None, "-N", "-L", f"127.0.0.1:{local}:localhost:{port}",
                          "-D", f"127.0.0.1:{socks}", "-o", "ExitOnForwardFailure=yes"),
            stderr=subprocess.PIPE)
        try:
            def get(*extra: str) -> bytes:
                return subprocess.run(["curl", "-s", "--max-time", "5", *extra],
                                      capture_output=True).stdout
            assert wait_for(lambda: get(f"http://127.0.0.1:{local}/") == b"hello-erin\n", 30)
            assert get("--socks5-hostname", f"127.0.0.1:{socks}",
                       f"http://localhost:{port}/") == b"hello-erin\n"
        finally:
            tunnel.terminate()
            tunnel.wait(10)
    finally:
        server.kill()
        server.wait(10)


def test_client_gone_ends_its_session(live: InProcessGateway) -> None:
    """kill -9 of the client: its pty shell's foreground job and a command session are gone
    within the grace period; processes she detached (setsid, nohup, a tmux session) survive, as
    under sshd.  tmux is in the DinD image; the fake backend has it only if this host has."""
    import random
    import signal

    n = random.randrange(10_000, 90_000) * 10

    def alive(k: int) -> bool:  # "slee[p]" does not match the pgrep's own command line
        return live.ssh("alice", f"pgrep -f 'slee[p] {k}$' >/dev/null").returncode == 0

    tmux = live.kind != "fake" or shutil.which("tmux") is not None
    detached = [n + 1, n + 2] + ([n + 4] if tmux else [])
    child = pexpect.spawn(" ".join(live.ssh_args("alice", None, "-tt")), timeout=60)
    client = subprocess.Popen(live.ssh_args("alice") + [f"sleep {n + 3}"],
                              stdin=subprocess.PIPE)
    try:
        child.sendline((f"tmux new-session -d -s dgw{n} 'sleep {n + 4}'; " if tmux else "") +
                       f"setsid sleep {n + 1} </dev/null >/dev/null 2>&1 & "
                       f"nohup sleep {n + 2} >/dev/null 2>&1 & sleep {n}")
        assert wait_for(lambda: all(alive(k) for k in [n, n + 3, *detached]), 60)
        os.kill(child.pid, signal.SIGKILL)
        client.kill()
        assert wait_for(lambda: not alive(n) and not alive(n + 3), 30), "session outlived client"
        assert [k for k in detached if not alive(k)] == []
        if tmux:
            r = live.ssh("alice", f"tmux has-session -t dgw{n}")
            assert r.returncode == 0, r.stderr
    finally:
        child.close(force=True)
        client.wait(10)
        live.ssh("alice", (f"tmux kill-session -t dgw{n} 2>/dev/null; " if tmux else "") +
                 f"pkill -f 'slee[p] {n}' ; pkill -f 'slee[p] {n + 1}$'; "
                 f"pkill -f 'slee[p] {n + 2}$'; true")


def test_remote_forward_reaches_the_client_from_inside(live: InProcessGateway) -> None:
    """`ssh -R P:127.0.0.1:L`: inside her environment 127.0.0.1:P is the client's service;
    the listener ends with the connection; a key's permitlisten is honoured."""
    import http.server

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            body = b"from-the-laptop\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    laptop = http.server.HTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=laptop.serve_forever, daemon=True).start()
    local, port = laptop.server_address[1], free_port()
    fetch = (f"for i in $(seq 100); do curl -sf http://127.0.0.1:{port}/ && exit 0; "
             "sleep 0.1; done; exit 1")
    try:
        r = live.ssh("alice", fetch, opts=("-o", "ExitOnForwardFailure=yes",
                                           "-R", f"{port}:127.0.0.1:{local}"))
        assert r.returncode == 0 and r.stdout == b"from-the-laptop\n", r.stderr
        gone = live.ssh("alice", f"curl -s --max-time 3 http://127.0.0.1:{port}/")
        assert gone.returncode != 0 and gone.stdout == b"", gone.stdout
        r = live.ssh("frank", "true", key="alice2",
                     opts=("-o", "ExitOnForwardFailure=yes", "-R", f"7001:127.0.0.1:{local}"))
        assert r.returncode != 0, r.stderr
        r = live.ssh("frank", fetch.replace(str(port), "7000"), key="alice2",
                     opts=("-o", "ExitOnForwardFailure=yes", "-R", f"7000:127.0.0.1:{local}"))
        assert r.returncode == 0 and r.stdout == b"from-the-laptop\n", r.stderr
    finally:
        laptop.shutdown()


def test_remote_forward_requested_by_a_short_connection_is_not_left(
        live: InProcessGateway) -> None:
    """A client that asks for `-R P` and is gone before the answer (the listener is still
    being made; on Kubernetes that takes an exec): the listener made after the connection
    ended is closed too, not left listening in her environment."""
    ports = [free_port() for _ in range(3)]

    async def ask_and_vanish(port: int) -> None:
        conn = await asyncssh.connect("127.0.0.1", live.port, username="alice",
                                      client_keys=[str(live.keys["alice"])], known_hosts=None)
        request = asyncio.ensure_future(conn.forward_remote_port("", port, "127.0.0.1", 9))
        await asyncio.sleep(0)  # one loop pass: the request is on the wire
        conn.abort()
        with contextlib.suppress(asyncssh.Error, asyncssh.ChannelListenError, OSError,
                                 asyncio.CancelledError):
            await request
        await conn.wait_closed()

    for port in ports:
        asyncio.run(ask_and_vanish(port))
    # nothing may accept on them: polled, with a deadline
    probe = " ".join(str(p) for p in ports)
    r = live.ssh("alice", f"for i in $(seq 100); do left=; for p in {probe}; do "
                 "(exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && left=\"$left $p\"; done; "
                 "[ -z \"$left\" ] && exit 0; sleep 0.1; done; echo $left; exit 1")
    assert r.returncode == 0, f"still listening in her environment: {r.stdout!r} {r.stderr!r}"


def test_agent_forwarding_into_the_environment(live: InProcessGateway, tmp_path) -> None:
    """`ssh -A`: ssh-add inside sees the client's key through a socket in her environment
    (hers alone), none on the gateway host; a key with no-agent-forwarding gets none."""
    import glob
    import tempfile

    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(sock.exists, 10)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(live.keys["other"])], env=env, check=True,
                       capture_output=True)
        fingerprint = subprocess.run(["ssh-keygen", "-lf", str(live.keys["other"])],
                                     capture_output=True, text=True).stdout.split()[1]
        before = set(glob.glob(os.path.join(tempfile.gettempdir(), "asyncssh-*")))
        r = subprocess.run(live.ssh_args("alice", None, "-A") + [
            'ssh-add -l; stat -c "%U %a" "$SSH_AUTH_SOCK" "$(dirname "$SSH_AUTH_SOCK")"'],
            env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert fingerprint in lines[0], (r.stdout, r.stderr)
        # her directory, hers alone (the fake backend's processes are the gateway's user)
        owner = "alice" if live.kind != "fake" else __import__("getpass").getuser()
        assert lines[2].split() == [owner, "700"], r.stdout
        assert lines[1].split()[0] == owner, r.stdout
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "asyncssh-*"))) == before
        r = subprocess.run(live.ssh_args("frank", "alice2", "-A") + [
            'echo "${SSH_AUTH_SOCK-none}"; ssh-add -l'],
            env=env, capture_output=True, text=True, timeout=60)
        assert r.stdout.splitlines()[0] == "none" and r.returncode != 0, (r.stdout, r.stderr)
    finally:
        agent.terminate()
        agent.wait(10)


def test_agent_socket_goes_with_the_connection(live: InProcessGateway, tmp_path) -> None:
    """The forwarded agent's socket and its private directory exist while the connection
    does, and are removed when it ends (as sshd removes its agent socket)."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        assert wait_for(sock.exists, 10)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        r = subprocess.run(live.ssh_args("alice", None, "-A") + [
            'test -S "$SSH_AUTH_SOCK" && dirname "$SSH_AUTH_SOCK"'],
            env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip(), (r.stdout, r.stderr)
        directory = r.stdout.strip()
    finally:
        agent.terminate()
        agent.wait(10)
    # removed once the gateway has seen the connection end: polled, with a deadline
    r = live.ssh("alice", f"for i in $(seq 100); do [ -e {directory} ] || exit 0; sleep 0.1; "
                 "done; exit 1")
    assert r.returncode == 0, f"{directory} still there after the connection ended"


# What VS Code Remote-SSH does on connect: `ssh -T host bash` with a script on stdin that
# starts its server bound to 127.0.0.1 on a random port (and on a unix socket), detached, and
# prints where; the client then tunnels to it with -L / -D or a socket forward.
VSCODE_BOOTSTRAP = r"""
set -e
dir="$HOME/.vscode-server-test"
mkdir -p "$dir"
cat > "$dir/server.py" <<'PY'
import http.server, os, socketserver, sys, threading

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"vscode-server-ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    def get_request(self):
        conn, _ = super().get_request()
        return conn, ("unix", 0)

tcp = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
if os.path.exists(sys.argv[1]):
    os.unlink(sys.argv[1])
threading.Thread(target=Unix(sys.argv[1], H).serve_forever, daemon=True).start()
print(f"listeningOn=={tcp.server_address[1]}==", flush=True)
tcp.serve_forever()
PY
nohup python3 "$dir/server.py" "$dir/code.sock" > "$dir/log" 2>&1 &
echo "pid==$!=="
for i in $(seq 100); do grep -q listeningOn "$dir/log" && break; sleep 0.1; done
cat "$dir/log"
echo "socket==$dir/code.sock=="
"""


def test_vscode_remote_ssh_flow(live: InProcessGateway, tmp_path) -> None:
    import re

    r = live.ssh("alice", "bash", opts=("-T",), input=VSCODE_BOOTSTRAP.encode())
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    port = int(re.search(r"listeningOn==(\d+)==", out).group(1))
    path = re.search(r"socket==(.+)==", out).group(1)
    pid = re.search(r"pid==(\d+)==", out).group(1)
    local, socks, sock = free_port(), free_port(), tmp_path / "code.sock"
    tunnel = subprocess.Popen(
        live.ssh_args("alice", None, "-N", "-o", "ExitOnForwardFailure=yes",
                      "-L", f"127.0.0.1:{local}:127.0.0.1:{port}", "-D", f"127.0.0.1:{socks}",
                      "-L", f"{sock}:{path}"), stderr=subprocess.PIPE)
    try:
        def get(*extra: str) -> bytes:
            return subprocess.run(["curl", "-s", "--max-time", "5", *extra],
                                  capture_output=True).stdout
        assert wait_for(lambda: get(f"http://127.0.0.1:{local}/") == b"vscode-server-ok\n", 30)
        assert get("--socks5-hostname", f"127.0.0.1:{socks}",
                   f"http://127.0.0.1:{port}/") == b"vscode-server-ok\n"
        assert get("--unix-socket", str(sock), "http://x/") == b"vscode-server-ok\n"
    finally:
        tunnel.terminate()
        tunnel.wait(10)
        live.ssh("alice", f"kill {pid}")


def test_jetbrains_gateway_flow(live: InProcessGateway, tmp_path) -> None:
    """JetBrains Gateway: upload its backend over sftp, start it with exec, reach it with -L
    to 127.0.0.1."""
    script = tmp_path / "backend.sh"
    script.write_text("#!/bin/sh\nmkdir -p jb && echo jetbrains-ok > jb/index.html && "
                      "exec python3 -u -m http.server --bind 127.0.0.1 -d jb \"$1\"\n")
    base = live.ssh_args("alice")[1:-1]
    r = subprocess.run(["sftp", *["-P" if a == "-p" else a for a in base], "-b", "-",
                        "alice@127.0.0.1"], input=f"put {script} jb-backend.sh\n".encode(),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    port = free_port()
    backend = subprocess.Popen(live.ssh_args("alice") + [f"sh jb-backend.sh {port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = [backend.stdout.readline()]
        while b"Serving HTTP" not in seen[-1] and seen[-1] and len(seen) < 5:
            seen.append(backend.stdout.readline())
        assert b"Serving HTTP" in seen[-1], seen
        local = free_port()
        tunnel = subprocess.Popen(live.ssh_args("alice", None, "-N", "-L",
                                                f"127.0.0.1:{local}:127.0.0.1:{port}"),
                                  stderr=subprocess.PIPE)
        try:
            assert wait_for(lambda: subprocess.run(
                ["curl", "-s", "--max-time", "3", f"http://127.0.0.1:{local}/"],
                capture_output=True).stdout == b"jetbrains-ok\n", 30)
        finally:
            tunnel.terminate()
            tunnel.wait(10)
    finally:
        backend.kill()
        backend.wait(10)


def test_errors_name_no_internals(live: InProcessGateway) -> None:
    """A command too long for exec (one 200 KB argument) fails with the shell's own words."""
    async def long_command() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(  # OpenSSH's own argv cannot carry it
                "127.0.0.1", live.port, username="alice", client_keys=[str(live.keys["alice"])],
                known_hosts=None) as conn:
            return await conn.run("true " * 40_000)

    done = asyncio.run(long_command())
    err = done.stderr or ""
    assert done.exit_status != 0 and "argument list too long" in err.lower(), err
    assert "dgw" not in err and "spare" not in err, err
    r = live.ssh("alice", "no-such-command-here")
    assert r.returncode == 127 and b"dgw" not in r.stderr, r.stderr


def test_mosh_is_refused_with_a_reason(live: InProcessGateway) -> None:
    r = live.ssh("alice", "mosh-server new -s -l LANG=C.UTF-8")
    assert r.returncode == 1 and b"mosh is not supported here" in r.stderr, r.stderr


def test_git_over_ssh_speaks_protocol_v2(live: InProcessGateway, tmp_path) -> None:
    """git clone/push through the gateway, and GIT_TRACE_PACKET shows protocol v2 (git sends
    GIT_PROTOCOL=version=2 as an environment request)."""
    r = live.ssh("alice", "rm -rf repo.git && git init -q --bare repo.git")
    assert r.returncode == 0, r.stderr
    ssh_cmd = " ".join(live.ssh_args("alice")[:-1])
    env = {**os.environ, "GIT_SSH_COMMAND": ssh_cmd, "GIT_TRACE_PACKET": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    work = tmp_path / "work"

    def git(*args: str, cwd=None) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True,
                              timeout=120)

    assert git("clone", "-q", "alice@127.0.0.1:repo.git", str(work)).returncode == 0
    (work / "f.txt").write_text("hello\n")
    assert git("add", "f.txt", cwd=work).returncode == 0
    assert git("commit", "-qm", "one", cwd=work).returncode == 0
    push = git("push", "-q", "origin", "HEAD:main", cwd=work)
    assert push.returncode == 0, push.stderr[-2000:]
    ls = git("ls-remote", "alice@127.0.0.1:repo.git")
    assert ls.returncode == 0 and b"refs/heads/main" in ls.stdout, ls.stderr[-2000:]
    assert b"ls-remote< version 2" in ls.stderr, ls.stderr[-2000:]  # v0 would not say
