"""Issue 10, the escape suite: every attack made as alice through the real gateway and the real
`ssh` client, under the default (rootless) profile, each asserting that it fails.

Each probe is harmless where it would succeed: a sysctl is rewritten with its own current
value, a binfmt_misc entry would be removed at once, mounts are read-only. The host's own
values are read before and after by the test process itself.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import threading
from pathlib import Path

import asyncssh
import docker
import pytest

from .conftest import GatewayProc, pubkey, wait_for

# An inner image with just a shell and cat, built from files already in alice's container.
PROBE_IMAGE = ("cd / && tar -ch usr/bin/dash usr/bin/cat $(ldd /usr/bin/dash /usr/bin/cat | "
               "grep -o '/[^ ]*' | sed 's,^/,,' | sort -u) 2>/dev/null | docker import - probe "
               ">/dev/null")
REWRITE = 'v=$(cat {p}) && printf "%s\\n" "$v" > {p}'  # the sysctl's own value, back again


@pytest.fixture(scope="module")
def iso(tmp_path_factory, keys: dict[str, Path], docker_client: docker.DockerClient):
    # DGW_TEST_PROFILE=hardened runs the same attacks against that profile (docs/security.md)
    gw = GatewayProc(tmp_path_factory.mktemp("iso"), keys, metrics_listen="127.0.0.1:0",
                     security_profile=os.environ.get("DGW_TEST_PROFILE", "rootless"))
    gw.write_users({
        "alice": {"keys": [pubkey(keys["alice"])], "memory": "512m", "pids": 300, "cpus": 1,
                  "disk": "300m"},
        "bob": {"keys": [pubkey(keys["bob"])], "memory": "512m", "pids": 300, "cpus": 1,
                "disk": "300m"},
    })
    gw.start()
    r = gw.ssh("alice", PROBE_IMAGE)
    assert r.returncode == 0, r.stderr
    assert gw.ssh("bob", "echo bob-secret > secret.txt").returncode == 0
    yield gw
    gw.teardown(docker_client, 120)


def run(gw: GatewayProc, command: str, user: str = "alice") -> tuple[int, str]:
    r = gw.ssh(user, command)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def test_no_root_for_the_user(iso: GatewayProc) -> None:
    code, out = run(iso, "id -u; grep -E '^Cap(Eff|Prm)' /proc/self/status")
    # her own host uid (gateway/backend/docker/uids.py), not the host's first user's 1000
    assert code == 0 and 40000 <= int(out.split()[0]) <= 59999, out
    assert re.findall(r"Cap(?:Eff|Prm):\s+(\w+)", out) == ["0000000000000000"] * 2, out
    code, out = run(iso, "sudo -n true")
    assert code != 0, out
    code, out = run(iso, "find / -xdev -type f -perm /6000 2>/dev/null")
    assert code in (0, 1) and out.strip() == "", f"setuid/setgid binaries: {out}"
    # nowhere on the container's root filesystem is writable for her (tmpfs and her volumes
    # are other filesystems)
    code, out = run(iso, "find / -xdev -writable ! -type l 2>/dev/null | grep -v ^/proc/")
    code, mounts = run(iso, "awk '{print $5}' /proc/self/mountinfo")
    assert set(out.split()) <= {"/tmp", "/var/tmp", "/var/lib/docker", "/home/alice"}, out
    assert set(out.split()) <= set(mounts.split())  # only mount points of other filesystems


@pytest.mark.parametrize("via", ["user", "sudo", "userns-root", "inner-sysadmin"])
@pytest.mark.parametrize("sysctl", ["kernel/core_pattern", "vm/overcommit_memory"])
def test_host_sysctls_stay_closed(iso: GatewayProc, via: str, sysctl: str) -> None:
    path = f"/proc/sys/{sysctl}"
    before = Path(path).read_text()
    write = REWRITE.format(p=path)
    command = {
        "user": write,
        "sudo": f"sudo -n sh -c '{write}'",
        "userns-root": f"unshare -r sh -c '{write}'",
        "inner-sysadmin": f"docker run --rm --cap-add SYS_ADMIN probe /usr/bin/dash -c '{write}'",
    }[via]
    code, out = run(iso, f"{command}; echo rc=$?")
    assert "rc=0" not in out, out
    assert re.search(r"Permission denied|Read-only file system|Operation not permitted|"
                     r"must be owned by uid 0 and have the setuid bit", out), out
    assert Path(path).read_text() == before


def test_binfmt_misc_registration(iso: GatewayProc) -> None:
    name = f"dgwtest{secrets.token_hex(3)}"
    rule = f":{name}:M::DGWX{name}::/bin/true:"
    code, out = run(iso, f"echo '{rule}' > /proc/sys/fs/binfmt_misc/register; echo rc=$?; "
                         f"unshare -r --mount sh -c 'mount -t binfmt_misc none /mnt && "
                         f"echo \"{rule}\" > /mnt/register && ls /mnt'; echo rc2=$?")
    host = Path("/proc/sys/fs/binfmt_misc") / name
    if host.exists():  # an escape: undo it at once, then fail
        host.write_text("-1")
        pytest.fail(f"binfmt_misc entry reached the host: {out}")
    assert "rc=0" not in out, out  # the host's register file is not hers to write


def test_mknod_and_mount_of_the_host_disk(iso: GatewayProc) -> None:
    dev = os.stat("/").st_dev
    major, minor = os.major(dev), os.minor(dev)
    for prefix in ("", "sudo -n ", "unshare -r "):
        code, out = run(iso, f"{prefix}mknod /tmp/hostdisk b {major} {minor}; echo rc=$?")
        assert "rc=0" not in out, out
    code, out = run(iso, "unshare -r --mount sh -c 'mount -o ro -t ext4 /dev/vda /mnt'; "
                         "echo rc=$?")
    assert "rc=0" not in out, out


def test_own_cgroup_limits_are_read_only(iso: GatewayProc) -> None:
    for f in ("pids/pids.max", "memory/memory.limit_in_bytes", "cpu/cpu.cfs_quota_us"):
        path = f"/sys/fs/cgroup/{f}"
        code, out = run(iso, f"{REWRITE.format(p=path)}; echo rc=$?; "
                             f"sudo -n sh -c '{REWRITE.format(p=path)}'; echo rc2=$?")
        assert "rc=0" not in out and "rc2=0" not in out, (f, out)
        assert "Read-only file system" in out, (f, out)


def test_engine_gateway_and_bob_are_out_of_reach(iso: GatewayProc,
                                                 docker_client: docker.DockerClient) -> None:
    # her DOCKER_HOST is her own rootless daemon, not the host's engine
    code, out = run(iso, "docker info -f '{{.SecurityOptions}}'")
    assert "rootless" in out, out
    host_id = docker_client.info()["ID"]
    code, out = run(iso, "docker info -f '{{.ID}}'")
    assert host_id not in out
    # inner -v /:/host, --pid=host, --net=host see only her own container
    code, out = run(iso, "docker run --rm -v /:/host probe /usr/bin/cat /host/etc/hostname")
    assert out.strip() == "alice-devbox", out
    code, out = run(iso, "docker run --rm --pid=host probe /usr/bin/dash -c "
                         "'cat /proc/*/cmdline 2>/dev/null' | tr '\\0' ' '; echo rc=$?")
    assert "gateway serve" not in out and "dockerd --host=fd" not in out, out
    code, out = run(iso, "docker run --rm --net=host probe /usr/bin/cat /proc/net/dev")
    host_ifaces = {ln.split(":")[0].strip() for ln in Path("/proc/net/dev").read_text()
                   .splitlines()[2:]} - {"lo", "docker0"}
    assert "tap0:" in out and not [i for i in host_ifaces if f"{i}:" in out], out
    # the gateway's state (host key, control socket, audit log) and bob's files
    state = iso.dir / "state"
    code, out = run(iso, f"ls {state} /var/lib/dind-gateway 2>&1; cat /home/bob/secret.txt; "
                         "find / -name secret.txt -path '*bob*' 2>/dev/null")
    assert "bob-secret" not in out and "control.sock" not in out, out
    # the metrics port and the SSH port of the gateway, through every address of the host
    metrics = int(re.search(r"metrics on http://127.0.0.1:(\d+)", iso.tail(400)).group(1))
    bob = docker_client.containers.get(iso.container_name("bob"))
    bob_ip = next(iter(bob.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    alice = docker_client.containers.get(iso.container_name("alice"))
    gateway_ip = next(iter(alice.attrs["NetworkSettings"]["Networks"].values()))["Gateway"]
    for url in (f"http://{gateway_ip}:{metrics}/metrics", f"http://{gateway_ip}:{iso.port}/",
                f"http://{gateway_ip}:2375/", f"http://{bob_ip}:22/"):
        code, out = run(iso, f"curl -s -o /dev/null --max-time 3 {url}; echo rc=$?")
        assert out.strip() != "rc=0", (url, out)


def test_host_services_on_all_addresses_are_out_of_reach(
        iso: GatewayProc, docker_client: docker.DockerClient) -> None:
    """A host service bound to 0.0.0.0 (a database, the host's own sshd) is not hers to reach
    through her network's gateway address: the gateway's host firewall drops new connections
    from the user network pool to the host."""
    alice = docker_client.containers.get(iso.container_name("alice"))
    gateway_ip = next(iter(alice.attrs["NetworkSettings"]["Networks"].values()))["Gateway"]
    accepted: list[tuple[str, int]] = []
    with socket.create_server(("0.0.0.0", 0)) as srv:
        port = srv.getsockname()[1]
        srv.settimeout(0.2)

        def serve() -> None:
            while True:
                try:
                    conn, peer = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                accepted.append(peer)
                conn.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with socket.create_connection((gateway_ip, port), timeout=3):  # the host itself can
            pass
        assert wait_for(lambda: len(accepted) == 1, 5), accepted
        code, out = run(iso, f"curl -s -o /dev/null --max-time 3 http://{gateway_ip}:{port}/; "
                             "echo rc=$?")
        srv.close()
    t.join(5)
    assert len(accepted) == 1, f"alice reached a host service on 0.0.0.0: {accepted}"
    assert out.strip() == "rc=28", out  # dropped (a timeout), not refused or answered


def test_nproc_tells_her_cpu_cap(iso: GatewayProc) -> None:
    # alice has cpus: 1 on a host with more; `make -j$(nproc)` must not size itself to the host
    assert os.cpu_count() and os.cpu_count() > 1
    code, out = run(iso, "nproc; bash -lc nproc")
    assert (code, out.split()) == (0, ["1", "1"]), out


def test_fork_bomb_and_memory_hog_stay_in_her_caps(iso: GatewayProc) -> None:
    code, out = run(iso, "python3 -c '\n"
                         "import os, time\n"
                         "n = 0\n"
                         "try:\n"
                         "    for _ in range(2000):\n"
                         "        if os.fork() == 0:\n"
                         "            time.sleep(20); os._exit(0)\n"
                         "        n += 1\n"
                         "except OSError as e:\n"
                         "    print(\"stopped\", n, e.errno)\n"
                         "'; pkill -u alice -f 'python3 -c' ; true")
    m = re.search(r"stopped (\d+) 11", out)
    assert m and int(m.group(1)) < 300, out
    code, out = run(iso, "python3 -c 'b = bytearray(1536 * 1024 * 1024); print(len(b))'; "
                         "echo rc=$?")
    assert "1610612736" not in out and ("MemoryError" in out or "rc=137" in out), out
    assert run(iso, "echo still-here") == (0, "still-here\n")
    assert run(iso, "echo bob-fine", user="bob") == (0, "bob-fine\n")


def test_disk_quota_full_then_raised_live(iso: GatewayProc, keys: dict[str, Path]) -> None:
    code, out = run(iso, "df -B1M --output=size ~ | tail -1")
    assert code == 0 and 200 < int(out) <= 300, out
    code, out = run(iso, "dd if=/dev/zero of=~/fill bs=1M count=400 2>&1; echo rc=$?")
    assert "No space left on device" in out and "rc=0" not in out, out
    # her daemon's image cache shares the quota: an import fails the same way
    code, out = run(iso, "docker pull no-such-registry.invalid/x 2>&1; docker images -q | wc -l")
    assert code == 0, out
    # bob and the gateway are unaffected
    assert run(iso, "echo more > more.txt && cat more.txt", user="bob") == (0, "more\n")
    # the admin raises the quota: it grows while she is logged in, no restart
    users = {"alice": {"keys": [pubkey(keys["alice"])], "memory": "512m", "pids": 300,
                       "cpus": 1, "disk": "600m"},
             "bob": {"keys": [pubkey(keys["bob"])], "memory": "512m", "pids": 300, "cpus": 1,
                     "disk": "300m"}}
    iso.write_users(users)
    assert wait_for(lambda: int(run(iso, "df -B1M --output=size ~ | tail -1")[1]) > 500, 20)
    code, out = run(iso, "dd if=/dev/zero of=~/fill2 bs=1M count=100 2>&1; echo rc=$?")
    assert "rc=0" in out, out
    # lowering below what she stores is refused with the reason; the quota stays
    users["alice"]["disk"] = "400m"
    iso.write_users(users)
    assert wait_for(lambda: "limits refused" in iso.tail(50), 20), iso.tail(50)
    assert "a quota can only grow" in iso.tail(50)
    assert int(run(iso, "df -B1M --output=size ~ | tail -1")[1]) > 500
    assert run(iso, "rm -f ~/fill ~/fill2 && echo ok") == (0, "ok\n")


def test_environment_names_are_matched_whole(iso: GatewayProc, keys: dict[str, Path]) -> None:
    """A client variable named "LANG\\n..." must not pass the filter (it used to, then was
    eval'd by the pre-started spare)."""
    import asyncio

    async def scenario() -> str:
        key = asyncssh.read_private_key(str(keys["alice"]))
        async with asyncssh.connect("127.0.0.1", iso.port, username="alice",
                                    client_keys=[key], known_hosts=None) as conn:
            r = await conn.run("env", env={"LANG\ntouch /tmp/pwned": "x", "LANG": "C.UTF-8"})
            return str(r.stdout)

    out = asyncio.run(scenario())
    assert "LANG=C.UTF-8" in out and "pwned" not in out, out
    assert run(iso, "ls /tmp/pwned 2>&1; echo rc=$?")[1].strip().endswith("rc=2")
