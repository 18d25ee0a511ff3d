"""The direct process path (backend/docker/direct.py): a session started by runc next to the
engine is the same process, to the kernel, as a `docker exec -u USER` one — same user and
groups, capability sets, seccomp, no_new_privs, cgroup, namespaces, AppArmor label and
rlimits — and really is runc's child, not dockerd's.

Real gateway, real engine, real OpenSSH client.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import docker

from gateway.backend.docker.direct import DirectExec

from .conftest import GatewayProc, wait_for

# What the kernel says about the process running it (each `cat` reads its own /proc/self).
PROBE = r"""
grep -E '^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp|Seccomp_filters):' \
  /proc/self/status
echo cgroup; cat /proc/self/cgroup
for n in cgroup ipc mnt net pid user uts; do echo "$n $(readlink /proc/self/ns/$n)"; done
echo "apparmor $(cat /proc/self/attr/current 2>/dev/null)"
echo "umask $(umask)"
cat /proc/self/limits
"""


def _host_parent(pid: int) -> tuple[int, str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    return ppid, Path(f"/proc/{ppid}/comm").read_text().strip()


def test_a_session_is_what_docker_exec_makes(gateway: GatewayProc,
                                             docker_client: docker.DockerClient) -> None:
    r = gateway.ssh("alice", PROBE)
    assert r.returncode == 0, r.stderr
    container = docker_client.containers.get(gateway.container_name("alice"))
    code, engine = container.exec_run(["sh", "-c", PROBE], user="alice")
    assert code == 0, engine
    assert r.stdout.decode().splitlines() == engine.decode().splitlines()
    # and it is not root, has no capabilities, and sits in her container's cgroup
    status = dict(line.split(":", 1) for line in r.stdout.decode().splitlines()
                  if line.startswith(("Uid", "CapEff", "NoNewPrivs")))
    assert status["Uid"].split()[0] != "0" and int(status["CapEff"], 16) == 0


def test_the_session_is_runcs_child_not_the_engines(gateway: GatewayProc,
                                                   docker_client: docker.DockerClient) -> None:
    """Proves the bytes did not go through dockerd: her process's host parent is the runc the
    gateway started (a `docker exec` one's is containerd-shim); seen from the host, it is in
    her container's cgroups."""
    n = random.randrange(10_000, 90_000) * 10 + 7
    client = subprocess.Popen(gateway.ssh_args("alice") + [f"exec sleep {n}"],
                              stdin=subprocess.PIPE)
    try:
        def found() -> list[int]:
            out = subprocess.run(["pgrep", "-f", f"^sleep {n}$"], capture_output=True,
                                 text=True).stdout
            return [int(p) for p in out.split()]
        assert wait_for(lambda: found(), 60)
        ppid, comm = _host_parent(found()[0])
        assert comm == "runc", comm
        assert _host_parent(ppid)[0] == gateway.proc.pid
        assert "through runc" in gateway.log.read_text()
        container = docker_client.containers.get(gateway.container_name("alice"))
        init = container.attrs["State"]["Pid"]
        mine = Path(f"/proc/{found()[0]}/cgroup").read_text()
        assert mine == Path(f"/proc/{init}/cgroup").read_text() and container.id in mine
    finally:
        client.kill()
        client.wait(10)
        gateway.ssh("alice", f"pkill -f 'slee[p] {n}$'; true")


def test_engine_path_when_asked(make_gateway, docker_client: docker.DockerClient) -> None:
    """process_path: engine keeps today's docker exec path (the fallback), probe alike."""
    gw = make_gateway(process_path="engine")
    gw.start()
    r = gw.ssh("alice", PROBE)
    assert r.returncode == 0, r.stderr
    container = docker_client.containers.get(gw.container_name("alice"))
    code, engine = container.exec_run(["sh", "-c", PROBE], user="alice")
    assert r.stdout.decode() == engine.decode()
    assert "through the engine's exec API" in gw.log.read_text()


def test_direct_path_does_not_wait_for_a_restart_to_find_runcs_state(tmp_path: Path) -> None:
    """A gateway started at boot, before the engine's first container made its runc state
    directory, still takes the direct path for containers runc knows from then on (it used to
    probe the directory once at start and stay on the engine's exec API until restarted)."""
    root = tmp_path / "runtime-runc" / "moby"
    direct = DirectExec.probe(str(root))
    try:
        assert direct is not None and not direct.knows("c0ffee")
        (root / "c0ffee").mkdir(parents=True)
        (root / "c0ffee" / "state.json").write_text("{}")
        assert direct.knows("c0ffee") and not direct.knows("other")
    finally:
        if direct is not None and direct.exits is not None:
            direct.exits.close()
