"""Issue 17, engine and gateway faults, end to end: a real gateway process, the real engine,
the real OpenSSH ssh / sftp and rsync.

- the gateway SIGKILLed in the middle of an sftp and an rsync upload: the files written
  before keep their sha256, the partial file is the client's to resume (`reput`,
  `rsync --partial`), and nothing of the killed sessions keeps running in her container;
- the state directory full: logins go on, one warning says the audit log is degraded, the
  audit log is written again (and records the gap) once there is room;
- the engine unreachable: at gateway start, and under an open session.  This is simulated
  by cutting the engine's socket (the gateway talks to it through `tests.sockproxy`); the
  host's dockerd itself is never stopped or restarted: other work uses it meanwhile.

No sleeps as synchronisation: every wait is on something observable, with a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import docker
import pytest

from .conftest import GatewayProc, free_port, processes, wait_for
from .sockproxy import SocketProxy

MIB = 1 << 20
BIG = 200 * MIB
# Slow enough that the kill lands mid-transfer on any machine, not a timing assertion.
SFTP_LIMIT_KBIT = 40_000  # 5 MB/s
RSYNC_LIMIT_KB = 5_000  # 5 MB/s
TRANSFER_SERVERS = ("sftp-server", "rsync")
# direct: sessions through runc, stdio the gateway's own pipes (the default where it can);
# engine: through the engine's exec API, every byte relayed by dockerd
PROCESS_PATHS = ("direct", "engine")


# --- helpers -----------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(MIB):
            h.update(block)
    return h.hexdigest()


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(size // MIB):
            fh.write(os.urandom(MIB))
        fh.write(os.urandom(size % MIB))


def in_container(client: docker.DockerClient, name: str, script: str) -> str:
    """Output of a shell snippet run in her container by the engine directly (not through
    the gateway, which may be dead at the time)."""
    result = client.containers.get(name).exec_run(["sh", "-c", script])
    return result.output.decode(errors="replace")


def remote_size(client: docker.DockerClient, gw: GatewayProc, user: str, glob: str) -> int:
    """Total size of the files matching `glob` in her home (0 if none)."""
    out = in_container(client, gw.container_name(user),
                       f"cd /home/{user} && cat {glob} 2>/dev/null | wc -c")
    return int(out.strip() or 0)


def remote_sums(gw: GatewayProc, user: str, rel: str) -> dict[str, str]:
    r = gw.ssh(user, f"cd {shlex.quote(rel)} && sha256sum *", timeout=300)
    assert r.returncode == 0, r.stderr
    return {line[66:]: line[:64] for line in r.stdout.decode().splitlines()}


def leftovers(client: docker.DockerClient, gw: GatewayProc, user: str) -> list[str]:
    return [p for p in processes(client, gw.container_name(user))
            if any(s in p for s in TRANSFER_SERVERS)]


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def log_text(gw: GatewayProc) -> str:
    return gw.log.read_text(errors="replace")


def sftp_argv(gw: GatewayProc, user: str, batch: Path, *extra: str) -> list[str]:
    opts = ["-P" if a == "-p" else a for a in gw.ssh_args(user)[1:-1]]
    return ["sftp", *extra, "-b", str(batch), *opts, f"{user}@127.0.0.1"]


def rsync_argv(gw: GatewayProc, user: str, src: Path, dst: str, *extra: str) -> list[str]:
    rsh = shlex.join(gw.ssh_args(user)[:-1])
    return ["rsync", "-a", "--partial", *extra, "-e", rsh, str(src), f"{user}@127.0.0.1:{dst}"]


@pytest.fixture
def kept_files(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Files uploaded before the fault, with their sha256."""
    root = tmp_path / "kept"
    root.mkdir()
    for i, size in enumerate((0, 1, 4096, 3 * MIB + 7, 11 * MIB)):
        write_random(root / f"k{i}.bin", size)
    return root, {p.name: sha256(p) for p in root.iterdir()}


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "big.bin"
    write_random(path, BIG)
    return path, sha256(path)


# --- gateway faults: SIGKILL mid-upload --------------------------------------------------------

@pytest.mark.parametrize("path", PROCESS_PATHS)
@pytest.mark.parametrize("tool", ["sftp", "rsync"])
def test_sigkill_mid_upload(make_gateway, docker_client: docker.DockerClient, tool: str,
                            path: str, kept_files, big_file, tmp_path: Path) -> None:
    gw = make_gateway(process_path=path)
    gw.start()
    user = "alice"
    kept, kept_sums = kept_files
    big, big_sum = big_file
    r = subprocess.run(rsync_argv(gw, user, kept, "."), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert remote_sums(gw, user, "kept") == kept_sums

    if tool == "sftp":
        batch = tmp_path / "put"
        batch.write_text(f'put "{big}" big.bin\n')
        argv = sftp_argv(gw, user, batch, "-l", str(SFTP_LIMIT_KBIT))
        growing = "big.bin"
    else:
        argv = rsync_argv(gw, user, big, "big.bin", f"--bwlimit={RSYNC_LIMIT_KB}")
        growing = ".big.bin.*"  # rsync's temporary file, until it is complete
    # a session that ignores its input's end: only the next gateway process can end it
    held = subprocess.Popen([*gw.ssh_args(user), "exec sleep 3600"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: "sleep 3600" in processes(docker_client, gw.container_name(user)),
                    60)
    client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: remote_size(docker_client, gw, user, growing) >= 20 * MIB,
                        180, 0.2), (client.poll(), gw.tail())
        assert leftovers(docker_client, gw, user), "no transfer server in her container"
        gw.stop(sig=9)
        assert gw.proc is not None and gw.proc.returncode == -9
        _, err = client.communicate(timeout=120)
        held.wait(120)
    finally:
        for proc in (client, held):
            if proc.poll() is None:
                proc.kill()
    assert client.returncode != 0, "the upload finished before the gateway was killed"
    print(f"{tool}: client after the kill: exit {client.returncode}, "
          f"{err.decode(errors='replace').strip()[-200:]!r}")
    # what the kill left running, before any new gateway process adopts the container
    left_at_kill = leftovers(docker_client, gw, user)
    print(f"{tool}: transfer processes left right after the kill: {left_at_kill}")
    t0 = time.monotonic()
    gone = wait_for(lambda: not leftovers(docker_client, gw, user), 30, 0.2)
    print(f"{tool}: they ended on their own (input closed by the engine): {gone}, "
          f"{time.monotonic() - t0:.1f} s")

    gw.start()
    assert wait_for(lambda: not leftovers(docker_client, gw, user), 120, 0.5), \
        leftovers(docker_client, gw, user)
    assert wait_for(lambda: "sleep 3600" not in processes(
        docker_client, gw.container_name(user)), 120, 0.5)
    assert f"session(s) of {user} left by the previous gateway process" in log_text(gw)
    assert remote_sums(gw, user, "kept") == kept_sums

    partial = remote_size(docker_client, gw, user, "big.bin")
    assert 0 < partial < BIG, f"{tool} left {partial} bytes of {BIG}"
    print(f"{tool}: partial file kept: {partial / MIB:.0f} MiB of {BIG / MIB:.0f}")
    if tool == "sftp":
        batch = tmp_path / "reput"
        batch.write_text(f'reput "{big}" big.bin\n')
        argv = sftp_argv(gw, user, batch)
    else:
        argv = rsync_argv(gw, user, big, "big.bin")
    r = subprocess.run(argv, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    r = gw.ssh(user, "sha256sum big.bin", timeout=300)
    assert r.returncode == 0 and r.stdout.split()[0].decode() == big_sum, (r.stdout, r.stderr)
    assert remote_sums(gw, user, "kept") == kept_sums
    assert not leftovers(docker_client, gw, user)
    assert "Traceback" not in log_text(gw)


# --- gateway faults: the state directory is full -----------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (unmounted at teardown, lazily if the gateway still holds a file)."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as fh:
        while True:  # the last bytes, below a block
            fh.write(b"\0")
    return filler


def audit_events(path: Path) -> list[dict]:
    """Every line must be a whole JSON object: no torn line from a full disk."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_state_dir_full_logins_go_on_audit_degrades_and_recovers(
        small_tmpfs: Path, make_gateway, docker_client: docker.DockerClient) -> None:
    gw = make_gateway(state_dir=str(small_tmpfs))
    gw.start()
    audit = small_tmpfs / "audit.log"
    r = gw.ssh("alice", "echo before-full")
    assert r.returncode == 0, r.stderr
    assert any(e.get("command") == "echo before-full" for e in audit_events(audit))

    filler = fill(small_tmpfs)
    assert os.statvfs(small_tmpfs).f_bavail == 0
    for i in range(5):
        r = gw.ssh("alice", f"echo while-full-{i}")
        assert r.returncode == 0 and r.stdout == f"while-full-{i}\n".encode(), r.stderr
    text = log_text(gw)
    assert text.count("audit log degraded") == 1, text[-3000:]
    assert "No space left on device" in text
    assert "Traceback" not in text
    # whole lines only; what still fitted in the file's last page was written, the rest not
    written = {e.get("command") for e in audit_events(audit)}
    assert not all(f"echo while-full-{i}" in written for i in range(5))

    filler.unlink()
    r = gw.ssh("alice", "echo after-full")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: any(e.get("command") == "echo after-full"
                                for e in audit_events(audit)), 30)
    events = audit_events(audit)
    gaps = [e for e in events if e["event"] == "audit.recovered"]
    assert len(gaps) == 1 and gaps[0]["dropped"] >= 1, gaps
    print(f"audit events lost while the state dir was full: {gaps[0]['dropped']}")
    assert "audit log" in log_text(gw) and "is written again" in log_text(gw)
    assert log_text(gw).count("audit log degraded") == 1
    gw.stop()


# --- engine faults: unreachable at start, and under an open session ----------------------------

@pytest.fixture
def engine_proxy(tmp_path: Path) -> Iterator[SocketProxy]:
    proxy = SocketProxy(tmp_path / "engine.sock")
    yield proxy
    proxy.close()


def engine_gateway(make_gateway, proxy: SocketProxy,
                   **settings: object) -> tuple[GatewayProc, int]:
    metrics = free_port()
    gw = make_gateway(docker_host=f"unix://{proxy.path}", metrics_listen=f"127.0.0.1:{metrics}",
                      **settings)
    return gw, metrics


def assert_try_again(gw: GatewayProc) -> None:
    """A login while the engine is away: told to try again, non-zero, no hang."""
    r = gw.ssh("alice", "echo should-not-run", timeout=120)
    assert r.returncode != 0 and b"should-not-run" not in r.stdout, r
    assert b"unavailable right now" in r.stderr and b"try again" in r.stderr, r.stderr


def test_engine_down_at_start_then_up(make_gateway, engine_proxy: SocketProxy,
                                      docker_client: docker.DockerClient) -> None:
    gw, metrics = engine_gateway(make_gateway, engine_proxy)
    gw.start()  # serves SSH although nothing listens on its docker_host yet
    text = log_text(gw)
    assert "does not answer at start" in text and "docker_host" in text, text
    assert "Traceback" not in text
    status, body = healthz(metrics)
    assert status == 503 and "unreachable" in body, (status, body)
    assert_try_again(gw)

    engine_proxy.start()
    r = gw.ssh("alice", "echo up")  # the same gateway process, no restart
    assert r.returncode == 0 and r.stdout == b"up\n", r.stderr
    assert gw.proc is not None and gw.proc.poll() is None
    status, body = healthz(metrics)
    assert status == 200 and body.startswith("ok"), (status, body)
    assert "Traceback" not in log_text(gw)


def read_until(pipe: IO[bytes], token: bytes, timeout: float) -> bytes:
    """What a child's pipe gave until `token` came (or the deadline passed, or EOF)."""
    got = b""
    deadline = time.monotonic() + timeout
    while token not in got and time.monotonic() < deadline:
        ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            break
        got += chunk
    return got


def test_engine_cut_under_open_session_engine_path(make_gateway, engine_proxy: SocketProxy,
                                                   docker_client: docker.DockerClient) -> None:
    """Sessions relayed by the engine end with it, with a clear message; the gateway keeps
    serving and recovers by itself."""
    engine_proxy.start()
    gw, metrics = engine_gateway(make_gateway, engine_proxy, process_path="engine")
    gw.start()
    assert gw.ssh("alice", "true").returncode == 0
    name = gw.container_name("alice")
    held = subprocess.Popen([*gw.ssh_args("alice"), "echo started; exec sleep 3600"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: "sleep 3600" in processes(docker_client, name), 60)
        engine_proxy.stop()
        out, err = held.communicate(timeout=120)
    finally:
        if held.poll() is None:
            held.kill()
    assert out == b"started\n"
    assert held.returncode != 0
    assert b"connection to the container engine was lost" in err, err
    assert gw.proc is not None and gw.proc.poll() is None
    assert_try_again(gw)
    status, _ = healthz(metrics)
    assert status == 503
    # her container never stopped: only the gateway's way to it was cut
    assert docker_client.containers.get(name).status == "running"

    engine_proxy.start()
    r = gw.ssh("alice", "echo back")
    assert r.returncode == 0 and r.stdout == b"back\n", r.stderr
    assert wait_for(lambda: healthz(metrics)[0] == 200, 30)
    # what the cut session left is ended once the engine answers again (as after a hang-up)
    assert wait_for(lambda: "sleep 3600" not in processes(docker_client, name), 120, 0.5), \
        processes(docker_client, name)
    assert "Traceback" not in log_text(gw)


def test_engine_cut_under_open_session_direct_path(make_gateway, engine_proxy: SocketProxy,
                                                   docker_client: docker.DockerClient) -> None:
    """Sessions through runc do not go through the engine: an open one goes on while the
    engine is away (new logins are told to try again), and ends normally."""
    engine_proxy.start()
    gw, metrics = engine_gateway(make_gateway, engine_proxy, process_path="direct")
    gw.start()
    assert "sessions start through runc" in log_text(gw)
    assert gw.ssh("alice", "true").returncode == 0
    held = subprocess.Popen([*gw.ssh_args("alice"), "echo started; exec cat"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert held.stdout is not None and held.stdin is not None
        assert b"started\n" in read_until(held.stdout, b"started\n", 60)
        engine_proxy.stop()
        assert_try_again(gw)
        assert healthz(metrics)[0] == 503
        held.stdin.write(b"during-the-cut\n")
        held.stdin.flush()
        assert b"during-the-cut\n" in read_until(held.stdout, b"during-the-cut\n", 60)
        held.stdin.close()
        assert held.wait(60) == 0, held.stderr.read() if held.stderr else b""
    finally:
        if held.poll() is None:
            held.kill()
    engine_proxy.start()
    r = gw.ssh("alice", "echo back")
    assert r.returncode == 0 and r.stdout == b"back\n", r.stderr
    assert wait_for(lambda: healthz(metrics)[0] == 200, 30)
    assert "Traceback" not in log_text(gw)
