"""Per-user host uids and subordinate ranges: each user's processes are her own host uid, so
per-uid kernel limits (inotify instances, ...) are hers alone; old volumes are migrated.

Everything through the real gateway, the real engine and the real OpenSSH client.
"""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from .conftest import GatewayProc, pubkey, wait_for

# Takes inotify instances until the kernel refuses one, records how many and why, then holds
# them until killed.
INOTIFY_HOG = """\
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
fds, err = [], 0
while len(fds) < 100000:
    fd = libc.inotify_init1(0)
    if fd < 0:
        err = ctypes.get_errno()
        break
    fds.append(fd)
with open("/tmp/held.tmp", "w") as f:
    f.write(f"{len(fds)} {err}\\n")
os.rename("/tmp/held.tmp", "/tmp/held")
signal.pause()
"""
# One inotify instance with a watch, as a file watcher (IDE, tail -f, webpack) makes it.
INOTIFY_ONE = ("python3 -c 'import ctypes; l = ctypes.CDLL(None, use_errno=True); "
               "fd = l.inotify_init1(0); print(fd, ctypes.get_errno())'")


@pytest.fixture(scope="module")
def duo(tmp_path_factory, keys: dict[str, Path], docker_client: docker.DockerClient):
    gw = GatewayProc(tmp_path_factory.mktemp("uids"), keys)
    gw.write_users({u: {"keys": [pubkey(keys[u])], "memory": "512m", "pids": 300, "cpus": 1}
                    for u in ("alice", "bob")})
    gw.start()
    for u in ("alice", "bob"):
        assert gw.ssh(u, "true").returncode == 0, gw.tail()
    yield gw
    gw.teardown(docker_client, 120)


def test_inotify_exhaustion_by_alice_leaves_bob_alone(duo: GatewayProc) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())  # read, never set
    r = duo.ssh("alice", "cat > /tmp/hog.py && (setsid nohup python3 /tmp/hog.py "
                "</dev/null >/tmp/hog.log 2>&1 &)", input=INOTIFY_HOG.encode())
    assert r.returncode == 0, r.stderr
    try:
        assert wait_for(lambda: duo.ssh("alice", "test -f /tmp/held").returncode == 0, 60)
        held, errno = map(int, duo.ssh("alice", "cat /tmp/held").stdout.split())
        # she took what her uid had left of the host's limit, and the kernel said EMFILE
        assert errno == 24 and 0 < held <= limit, (held, errno, limit)
        # her own next watcher fails (the limit is real) ...
        out = duo.ssh("alice", INOTIFY_ONE).stdout.split()
        assert out == [b"-1", b"24"], out
        # ... bob's does not
        out = duo.ssh("bob", INOTIFY_ONE).stdout.split()
        assert int(out[0]) >= 0, f"bob's inotify_init1 failed: {out}"
    finally:
        duo.ssh("alice", "pkill -f '^python3 /tmp/hog.py'; rm -f /tmp/held")
