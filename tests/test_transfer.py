"""Issue 3, end to end: scp (SFTP and legacy), sftp and rsync through the gateway.

Real client binaries talk to a real gateway process; the server side of every transfer is the
OpenSSH `sftp-server`, `scp -t/-f` or `rsync --server` running inside the user's container.
The transfer tests share one private gateway (users named after the tool, so nothing collides
with test_core's alice..erin) and one source tree with a 1 GiB file.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import shlex
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pexpect
import pytest

from .conftest import IMAGE, GatewayProc, pubkey, remove_labelled, wait_for

TOOLS = ("scp", "scp-O", "sftp", "rsync")
BIG = 1 << 30
CHUNK = 1 << 20
# tool -> user whose container does that tool's 1 GiB round trip; "new-*" users are only ever
# touched by the first-contact test, "oops" by the error test.
TOOL_USER = {"scp": "xscp", "scp-O": "xscpo", "sftp": "xsftp", "rsync": "xrsync"}
NEW_USER = {"scp": "new-scp", "scp-O": "new-scpo", "sftp": "new-sftp", "rsync": "new-rsync"}
ERR_USER = "oops"
PROGRESS = re.compile(rb"Starting your Docker environment.* ready in \d+\.\d s")

# (kind 'f'/'d', permission bits, mtime in whole seconds, sha256 for files)
Entry = tuple[str, int, int, str | None]


# --- the source tree ---------------------------------------------------------------------------

def _write_big(path: Path) -> None:
    """1 GiB of pseudo-random bytes; Mersenne Twister makes them at ~400 MB/s (urandom: ~same,
    but not reproducible)."""
    rng = random.Random(0xD16)
    with open(path, "wb") as fh:
        for _ in range(BIG // CHUNK):
            fh.write(rng.randbytes(CHUNK))


def make_tree(root: Path, big: bool) -> None:
    """The tree every tool moves: many small files, odd names, an empty file, modes and times."""
    rng = random.Random(3)
    root.mkdir(parents=True)
    for d in range(12):
        sub = root / f"d{d:02}"
        sub.mkdir()
        for f in range(25):
            (sub / f"f{f:03}.dat").write_bytes(rng.randbytes(rng.randrange(0, 6000)))
    (root / "file with spaces.txt").write_text("spaces survive the trip\n")
    (root / "empty").write_bytes(b"")
    deep = root / "dir with space" / "inner"
    deep.mkdir(parents=True)
    (deep / "x y.bin").write_bytes(rng.randbytes(70_000))
    script = root / "bin" / "run.sh"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o750)
    secret = root / "private.txt"
    secret.write_text("only me\n")
    secret.chmod(0o600)
    (root / "bin").chmod(0o710)
    for path, when in ((script, 981_158_400), (secret, 1_262_304_000),
                       (root / "empty", 1_000_000_000)):
        os.utime(path, (when, when))
    if big:
        _write_big(root / "big.bin")
    # Directories last, after everything inside them exists.
    os.utime(root / "bin", (1_100_000_000, 1_100_000_000))


def local_manifest(root: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), int(st.st_mtime), None)
                continue
            assert stat.S_ISREG(st.st_mode), rel
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
            out[rel] = ("f", stat.S_IMODE(st.st_mode), int(st.st_mtime), h.hexdigest())
    return out


def remote_manifest(gw: GatewayProc, user: str, rel: str) -> tuple[dict[str, Entry], set[str]]:
    """The same manifest computed inside the container (coreutils only), plus the owners seen.

    The absolute path checks that the client's relative path landed in the persistent home.
    """
    where = shlex.quote(f"/home/{user}/{rel}")
    r = gw.ssh(user, f"cd {where} && find . -mindepth 1 -exec stat --printf '%F|%a|%U|%Y|%n\\0' "
                     "{} + && printf '\\1' && find . -type f -exec sha256sum -z {} +",
               timeout=300)
    assert r.returncode == 0, r.stderr
    meta, _, sums = r.stdout.partition(b"\1")
    digests = {}
    for item in sums.split(b"\0")[:-1]:
        digests[item[66:].decode().removeprefix("./")] = item[:64].decode()
    out: dict[str, Entry] = {}
    owners = set()
    for item in meta.split(b"\0")[:-1]:
        kind, mode, owner, mtime, name = item.decode().split("|", 4)
        rel_name = name.removeprefix("./")
        owners.add(owner)
        if kind == "directory":
            out[rel_name] = ("d", int(mode, 8), int(mtime), None)
        else:
            assert kind in ("regular file", "regular empty file"), (name, kind)
            out[rel_name] = ("f", int(mode, 8), int(mtime), digests.get(rel_name))
    return out, owners


def diff(want: dict[str, Entry], got: dict[str, Entry]) -> list[str]:
    """Readable differences (first few), for assertion messages."""
    lines = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    lines += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    lines += [f"{k}: want {want[k]} got {got[k]}" for k in sorted(want.keys() & got.keys())
              if want[k] != got[k]]
    return lines[:20]


# --- the four clients ------------------------------------------------------------------------

def client_opts(gw: GatewayProc, user: str) -> list[str]:
    """The ssh options of GatewayProc.ssh_args, for scp and sftp (port flag is -P there)."""
    args = gw.ssh_args(user)[1:-1]
    return ["-P" if a == "-p" else a for a in args]


def rsh(gw: GatewayProc, user: str) -> str:
    return shlex.join(gw.ssh_args(user)[:-1])


def transfer(gw: GatewayProc, tool: str, user: str, src: str, dst: str, *, upload: bool,
             tmp: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Copy directory `src` to `dst` (which must not exist yet); the remote side is relative."""
    host = f"{user}@127.0.0.1"
    if tool in ("scp", "scp-O"):
        # Legacy scp hands the remote path to the remote shell: quoting is the user's job there
        # (as with any sshd); in SFTP mode it is a plain path.
        q = shlex.quote if tool == "scp-O" else str
        spec = (src, f"{host}:{q(dst)}") if upload else (f"{host}:{q(src)}", dst)
        argv = ["scp", "-s" if tool == "scp" else "-O", "-r", "-p", "-q",
                *client_opts(gw, user), *spec]
    elif tool == "sftp":
        batch = tmp / f"batch-{time.monotonic_ns()}"
        verb = "put" if upload else "get"
        batch.write_text(f'{verb} -r -p "{src}" "{dst}"\n')
        argv = ["sftp", "-b", str(batch), *client_opts(gw, user), host]
    else:
        spec = (f"{src}/", f"{host}:{dst}/") if upload else (f"{host}:{src}/", f"{dst}/")
        argv = ["rsync", "-a", "-e", rsh(gw, user), *spec]
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xgw(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path],
        docker_client: docker.DockerClient) -> Iterator[GatewayProc]:
    """A private gateway for this module: one user per tool, plus never-seen users."""
    d = tmp_path_factory.mktemp("xkeys")
    names = [*TOOL_USER.values(), *NEW_USER.values(), ERR_USER]
    own = dict(keys)
    for name in names:
        own[name] = d / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(own[name])], check=True)
    gw = GatewayProc(tmp_path_factory.mktemp("xgw"), own)
    gw.write_users({n: {"keys": [pubkey(own[n])], "memory": "1g", "pids": 1000, "cpus": 1}
                    for n in names})
    gw.start()
    yield gw
    gw.stop()
    print(f"--- transfer gateway log tail ---\n{gw.tail(120)}")
    remove_labelled(docker_client, gw.prefix)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Entry]]]:
    """The source tree with its 1 GiB file, made once and shared by the four tools."""
    base = tmp_path_factory.mktemp("tree")
    root = base / "src"
    make_tree(root, big=True)
    yield root, local_manifest(root)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def slow_image(docker_client: docker.DockerClient) -> Iterator[str]:
    """The user image with a daemon that takes 4 s longer to come up."""
    tag = "dgwtest/slow:latest"
    df = (f'FROM {IMAGE}\nENTRYPOINT ["/bin/sh","-c","sleep 4; exec /usr/local/bin/dind-init '
          f'\\"$@\\"","dind-init"]\n').encode()
    docker_client.images.build(fileobj=io.BytesIO(df), tag=tag, rm=True)
    yield tag
    docker_client.images.remove(tag, force=True)


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", TOOLS)
def test_roundtrip_tree_with_1gib_file(xgw: GatewayProc, tree, tool: str,
                                       tmp_path: Path) -> None:
    src, want = tree
    user, rel = TOOL_USER[tool], f"up {tool}"
    r = xgw.ssh(user, "true")  # start the container first: this test is about the transfer
    assert r.returncode == 0, r.stderr
    down = tmp_path / "down"
    try:
        t0 = time.monotonic()
        r = transfer(xgw, tool, user, str(src), rel, upload=True, tmp=tmp_path)
        up = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        got, owners = remote_manifest(xgw, user, rel)
        assert owners == {user}
        assert got == want, diff(want, got)

        t0 = time.monotonic()
        r = transfer(xgw, tool, user, rel, str(down), upload=False, tmp=tmp_path)
        dl = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        got = local_manifest(down)
        assert got == want, diff(want, got)
    finally:
        shutil.rmtree(down, ignore_errors=True)
        xgw.ssh(user, f"rm -rf {shlex.quote(rel)}")
    print(f"{tool}: 1 GiB tree up {up:.1f} s ({BIG / up / 2**20:.0f} MiB/s), "
          f"down {dl:.1f} s ({BIG / dl / 2**20:.0f} MiB/s)")
    assert xgw.proc is not None and xgw.proc.poll() is None


@pytest.mark.parametrize("tool", TOOLS)
def test_upload_as_first_contact(xgw: GatewayProc, docker_client: docker.DockerClient,
                                 tool: str, tmp_path: Path) -> None:
    """The very first thing a new user does is a transfer: the container is spawned for it,
    its progress text goes to stderr only, and the files are there in a later pty shell."""
    user = NEW_USER[tool]
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(xgw.container_name(user))
    src = tmp_path / "first"
    make_tree(src, big=False)
    (src / "blob.bin").write_bytes(random.Random(7).randbytes(5 * CHUNK + 123))
    want = local_manifest(src)
    r = transfer(xgw, tool, user, str(src), "first", upload=True, tmp=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    assert PROGRESS.search(r.stderr), r.stderr
    assert b"Starting" not in r.stdout
    got, owners = remote_manifest(xgw, user, "first")
    assert owners == {user}
    assert got == want, diff(want, got)

    args = xgw.ssh_args(user, None, "-tt")
    child = pexpect.spawn(args[0], args[1:], timeout=60, encoding="utf-8",
                          codec_errors="replace")
    try:
        child.sendline("cat ~/first/'file with spaces.txt'; sha256sum first/blob.bin; exit")
        child.expect_exact("spaces survive the trip")
        child.expect_exact(want["blob.bin"][3])
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_first_contact_upload_is_flow_controlled(make_gateway, slow_image: str,
                                                 keys: dict[str, Path],
                                                 docker_client: docker.DockerClient) -> None:
    """While the container is still starting, the client must be held back by the SSH window;
    the gateway must not swallow the upload into memory (it used to, without bound)."""
    gw = make_gateway(image=slow_image)
    gw.write_users({"alice": {"keys": [pubkey(keys["alice"])], "memory": "1g"}})
    gw.start()
    total, sent = 256 * CHUNK, [0]
    digest = hashlib.sha256()
    block = random.Random(11).randbytes(CHUNK)
    proc = subprocess.Popen([*gw.ssh_args("alice"), "cat > blob && sha256sum blob"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)

    def feed() -> None:
        assert proc.stdin is not None
        try:
            for i in range(total // CHUNK):
                chunk = i.to_bytes(8, "big") + block[8:]
                digest.update(chunk)
                proc.stdin.write(chunk)
                sent[0] += len(chunk)
        finally:
            proc.stdin.close()

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    # measured once the container has run 4 s without a daemon: the client was free to push
    def logs() -> str:
        try:
            return docker_client.containers.get(gw.container_name("alice")).logs().decode()
        except docker.errors.NotFound:
            return ""
    assert wait_for(lambda: "dind-init: starting" in logs(), 60)
    held_back_at = sent[0]
    assert "API listen on" not in logs()  # still starting when we looked
    writer.join(300)  # stdout/stderr are a few bytes: no pipe fills meanwhile
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.wait(60)
    assert proc.returncode == 0, err
    assert PROGRESS.search(err), err
    assert out.split()[0].decode() == digest.hexdigest()
    assert held_back_at < 64 * CHUNK, f"{held_back_at} bytes accepted before the container ran"
    assert gw.proc is not None
    hwm = int(re.search(r"VmHWM:\s+(\d+) kB",
                        Path(f"/proc/{gw.proc.pid}/status").read_text()).group(1))
    assert hwm < 200 * 1024, f"gateway peak RSS {hwm} kB"


@pytest.mark.parametrize("tool", TOOLS)
def test_errors_reach_the_client(xgw: GatewayProc, tool: str, tmp_path: Path) -> None:
    """Missing remote directory, read-only target, missing source: the client's own error and
    a non-zero exit, promptly; the gateway keeps serving."""
    user = ERR_USER
    r = xgw.ssh(user, "chmod -R u+w ro 2>/dev/null; rm -rf ro && mkdir ro && echo x > ro/old && "
                "chmod 444 ro/old && chmod 555 ro")
    assert r.returncode == 0, r.stderr
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("hello\n")
    host = f"{user}@127.0.0.1"
    if tool == "rsync":
        cases = {
            "missing dir": (["rsync", "-a", "-e", rsh(xgw, user), f"{src}/f.txt",
                             f"{host}:nodir/sub/f.txt"], 3, "No such file or directory"),
            "read-only": (["rsync", "-a", "-e", rsh(xgw, user), f"{src}/f.txt",
                           f"{host}:ro/f.txt"], 23, "Permission denied"),
            "missing source": (["rsync", "-a", "-e", rsh(xgw, user), f"{host}:nodir/f.txt",
                                str(tmp_path / "back.txt")], 23, "No such file or directory"),
        }
    elif tool == "sftp":
        def batch(name: str, line: str) -> list[str]:
            (tmp_path / name).write_text(line + "\n")
            return ["sftp", "-b", str(tmp_path / name), *client_opts(xgw, user), host]
        cases = {
            "missing dir": (batch("b1", f'put "{src}/f.txt" nodir/f.txt'), 1,
                            "No such file or directory"),
            "read-only": (batch("b2", f'put "{src}/f.txt" ro/f.txt'), 1, "Permission denied"),
            "read-only file": (batch("b3", f'put "{src}/f.txt" ro/old'), 1,
                               "Permission denied"),
            "missing source": (batch("b4", f'get nodir/f.txt "{tmp_path}/back.txt"'), 1,
                               "not found"),
        }
    else:
        scp = ["scp", "-s" if tool == "scp" else "-O", *client_opts(xgw, user)]
        cases = {
            "missing dir": ([*scp, f"{src}/f.txt", f"{host}:nodir/f.txt"], 1,
                            "No such file or directory"),
            "read-only": ([*scp, f"{src}/f.txt", f"{host}:ro/f.txt"], 1, "Permission denied"),
            "read-only file": ([*scp, f"{src}/f.txt", f"{host}:ro/old"], 1,
                               "Permission denied"),
            "missing source": ([*scp, f"{host}:nodir/f.txt", str(tmp_path / "back.txt")], 1,
                               "No such file or directory"),
        }
    for case, (argv, code, message) in cases.items():
        t0 = time.monotonic()
        r = subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == code, (case, r.returncode, r.stderr)
        assert time.monotonic() - t0 < 30, case
        if tool != "rsync":
            # rsync's server reports on stderr and its exit code on stdout; Docker does not
            # keep the order of the two, and rsync's client stops reading at the exit code,
            # so its message may or may not be printed. The exit code is always right.
            assert message in r.stderr.decode(), (case, r.stderr)
        assert not (tmp_path / "back.txt").exists()
    r = xgw.ssh(user, "cat ro/old; ls ro")
    assert r.stdout == b"x\nold\n", r.stderr
    assert xgw.proc is not None and xgw.proc.poll() is None
    if tool == "scp-O":
        assert re.search(rf"scp session of {user} ended: status 1,", xgw.tail(400))
