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
import ctypes, os, resource, signal
# the fd limit must not be what stops her: only the per-uid inotify limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
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


# An inner image with a shell and the few tools the tests use, from files already in the
# user's container (no registry anywhere).
TOOLS = ("cd / && f='usr/bin/dash usr/bin/cat usr/bin/sleep usr/bin/touch usr/bin/chown "
         "usr/bin/stat usr/bin/id usr/bin/mkdir usr/bin/cp usr/bin/chmod' && l=$(ldd $(for b in "
         "$f; do echo /$b; done) | grep -o '/[^ ]*' | sed 's,^/,,' | sort -u) && d=$(for p in $f "
         "$l; do echo $p; done | awk -F/ '{p = $1; print p; for (i = 2; i < NF; i++) "
         "{p = p \"/\" $i; print p}}' | sort -u) && tar -ch --no-recursion $d $f $l 2>/dev/null"
         " | docker import -c 'CMD [\"/usr/bin/dash\"]' - tools >/dev/null")


def ids_of(gw: GatewayProc, user: str) -> tuple[int, int]:
    """Her uid as she sees it, and the start of her subordinate range from /etc/subuid."""
    r = gw.ssh(user, "id -u; grep \"^$(id -un):\" /etc/subuid /etc/subgid")
    lines = r.stdout.decode().split()
    uid, sub_u, sub_g = int(lines[0]), lines[1].split(":"), lines[2].split(":")
    assert sub_u[2:] == sub_g[2:] and sub_u[3] == "65536", lines
    return uid, int(sub_u[2])


def host_uids(client: docker.DockerClient, name: str) -> dict[int, str]:
    """Host uid -> command of every process in a container, read from the host's /proc."""
    top = client.containers.get(name).top(ps_args="-eo pid,args")
    out = {}
    for pid, args in ((int(p[0]), p[1]) for p in top["Processes"]):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:  # exited meanwhile
            continue
        uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
        out.setdefault(uid, args)
    return out


def test_each_user_has_her_own_host_uid_and_range(duo: GatewayProc,
                                                  docker_client: docker.DockerClient) -> None:
    from gateway.backend.docker.uids import SUB_BASE, SUB_COUNT, UID_BASE

    alice, bob = ids_of(duo, "alice"), ids_of(duo, "bob")
    assert alice != bob and {alice[0], bob[0]} == {UID_BASE, UID_BASE + 1}, (alice, bob)
    for uid, sub in (alice, bob):
        assert sub == SUB_BASE + (uid - UID_BASE) * SUB_COUNT  # disjoint ranges
    # an inner container of each, as inner uid 5: on the host that is her sub + 4
    for u in ("alice", "bob"):
        r = duo.ssh(u, f"{TOOLS} && docker run -d --user 5 tools /usr/bin/sleep 600")
        assert r.returncode == 0, r.stderr
    seen = {u: host_uids(docker_client, duo.container_name(u)) for u in ("alice", "bob")}
    for u, (uid, sub) in (("alice", alice), ("bob", bob)):
        mine = set(range(sub, sub + 65536)) | {uid}
        assert uid in seen[u], seen[u]  # her shell, her daemon
        assert sub + 4 in seen[u] and "sleep 600" in seen[u][sub + 4], seen[u]
        assert set(seen[u]) - {0} <= mine, f"{u}: processes outside her ids: {seen[u]}"
        assert 1000 not in seen[u]
    assert not (set(seen["alice"]) - {0}) & set(seen["bob"])
    for u in ("alice", "bob"):
        duo.ssh(u, "docker rm -f $(docker ps -q) >/dev/null")


def test_ids_are_stable_across_restarts_and_purge(make_gateway, keys: dict[str, Path],
                                                  docker_client: docker.DockerClient) -> None:
    import json
    import subprocess
    import sys

    from .conftest import ROOT

    gw = make_gateway()
    gw.start()
    first = {u: ids_of(gw, u) for u in ("dave", "erin")}
    assert len({v[0] for v in first.values()}) == 2
    data = json.loads((gw.dir / "state" / "uids.json").read_text())
    assert set(data["users"]) == {"dave", "erin"} and data["next"] == 2, data
    # gateway restart (container adopted) and container restart: same ids
    gw.stop()
    docker_client.containers.get(gw.container_name("erin")).stop()
    gw.start()
    assert {u: ids_of(gw, u) for u in ("dave", "erin")} == first
    # purge keeps her slot: the next environment of that name gets the same ids, and a new
    # user gets a new slot, never a freed one
    r = subprocess.run([sys.executable, "-m", "gateway", "purge", "dave", "--yes", "--config",
                        str(gw.config)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ids_of(gw, "dave") == first["dave"]
    carol = ids_of(gw, "carol")
    assert carol[0] > max(v[0] for v in first.values())


def test_concurrent_first_allocations_never_collide(tmp_path: Path) -> None:
    """Eight processes allocate overlapping names at once on one file."""
    import json
    import subprocess
    import sys

    from .conftest import ROOT

    script = ("import sys; from pathlib import Path\n"
              "from gateway.backend.docker.uids import UidMap\n"
              "m = UidMap(Path(sys.argv[1]))\n"
              "print(' '.join(f'{n}={m.get(n).uid}' for n in sys.argv[2:]))\n")
    names = [f"u{i}" for i in range(30)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "uids.json"),
                               *(names[i::2] if i % 2 else names[::-1])],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT) for i in range(8)]
    seen: dict[str, set[int]] = {}
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        for pair in out.split():
            name, uid = pair.split("=")
            seen.setdefault(name, set()).add(int(uid))
    assert all(len(v) == 1 for v in seen.values()), seen  # one uid per name everywhere
    uids = [next(iter(v)) for v in seen.values()]
    assert len(set(uids)) == len(names)  # and no two names share one
    data = json.loads((tmp_path / "uids.json").read_text())
    assert sorted(data["users"].values()) == list(range(len(names))) and data["next"] == 30


# Her image built on `tools`: a file of inner uid 5, a setuid file, and it runs as inner uid 5.
DOCKERFILE = """FROM tools
RUN ["/usr/bin/dash", "-c", "mkdir /data && touch /data/f && chown 5:7 /data/f && \\
cp /usr/bin/id /data/id-suid && chmod 4755 /data/id-suid"]
ENV PATH=/usr/bin
USER 5:7
"""
MIGRATION_FILES = 20000


@pytest.mark.parametrize("disk", [None, "400m"])
def test_volumes_of_the_previous_version_are_migrated(make_gateway, keys: dict[str, Path],
                                                      docker_client: docker.DockerClient,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      disk: str | None) -> None:
    from gateway.backend.docker.uids import SUB_BASE, UID_BASE, UID_LAST

    # 1. her environment as the previous version made it: uid 1000, subids 100000..165535
    monkeypatch.setenv("DGW_LEGACY_UIDS", "1")
    gw = make_gateway()
    gw.write_users({"carol": {"keys": [pubkey(keys["carol"])], "memory": "1g", "pids": 1000,
                              "cpus": 1, **({"disk": disk} if disk else {})}})
    gw.start()
    assert ids_of(gw, "carol") == (1000, 100000)
    setup = (f"{TOOLS} && cd ~ && mkdir -p ctx && printf '%s' '{DOCKERFILE}' > ctx/Dockerfile && "
             "docker build -q -t built ctx >/dev/null && "
             "docker volume create inner >/dev/null && "
             "docker run --rm -v inner:/v --user 0 tools /usr/bin/chown 5:7 /v && "
             "docker run --rm -v inner:/v built /usr/bin/touch /v/by5 && "
             "mkdir -p shared && chmod 777 shared && "
             "docker run --rm -v ~/shared:/s built /usr/bin/touch /s/by5 && "
             "echo mine > notes.txt && mkdir many && "
             f"python3 -c 'for i in range({MIGRATION_FILES}): open(f\"many/{{i}}\", \"w\")' && "
             "stat -c '%u:%g' notes.txt shared/by5")
    r = gw.ssh("carol", setup, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"1000:1000", b"100004:100006"], r.stdout
    gw.stop()
    # what the previous version's volumes look like: no migration marker; container stopped
    name = gw.container_name("carol")
    old = docker_client.containers.get(name)
    assert old.exec_run(["rm", "/var/lib/docker/.dgw-ids"], user="0").exit_code == 0
    old.stop()

    # 2. this version: her own ids; the container is made again, the init moves her files
    monkeypatch.delenv("DGW_LEGACY_UIDS")
    gw.start()
    uid, sub = ids_of(gw, "carol")
    assert UID_BASE <= uid <= UID_LAST and sub >= SUB_BASE
    assert docker_client.containers.get(name).id != old.id
    r = gw.ssh("carol", "stat -c '%u:%g' . notes.txt shared/by5; cat notes.txt; "
               "find ~ /var/lib/docker -uid 1000 -o -gid 1000 -o -uid +99999 -uid -165537 "
               "| wc -l")
    assert r.stdout.split() == [f"{uid}:{uid}".encode(), f"{uid}:{uid}".encode(),
                                f"{sub + 4}:{sub + 6}".encode(), b"mine", b"0"], r.stdout
    # her old image, her inner volume, a setuid bit and inner ownership all still work
    r = gw.ssh("carol", "docker run --rm -v inner:/v built /usr/bin/dash -c "
               "'/usr/bin/id -u; /usr/bin/stat -c %u:%g:%a /data/f /data/id-suid /v/by5; "
               "/usr/bin/touch /v/again /data/f && echo wrote'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [b"5", b"5:7:644", b"0:0:4755", b"5:7:644", b"wrote"], r.stdout
    logs = docker_client.containers.get(name).logs().decode(errors="replace")
    moved = [ln for ln in logs.splitlines() if "ids moved:" in ln]
    assert len(moved) == 1, logs
    print(f"\nmigration of {MIGRATION_FILES} files plus her image (disk {disk}): {moved[0]}")
    if disk:  # the recreated container is on her quota disk still
        r = gw.ssh("carol", "df -B1M --output=size ~ /var/lib/docker | tail -2")
        assert [300 < int(n) <= 400 for n in r.stdout.split()] == [True, True], r.stdout
    # 3. once only: the next start finds the marker
    docker_client.containers.get(name).stop()
    assert gw.ssh("carol", "cat notes.txt").stdout == b"mine\n"
    logs = docker_client.containers.get(name).logs().decode(errors="replace")
    assert sum("ids moved:" in ln for ln in logs.splitlines()) == 1, logs
