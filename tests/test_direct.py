"""The direct process path (backend/docker/direct.py): a session started by runc next to the
engine is the same process, to the kernel, as a `docker exec -u USER` one — same user and
groups, capability sets, seccomp, no_new_privs, cgroup, namespaces, AppArmor label and
rlimits — and really is runc's child, not dockerd's.

Real gateway, real engine, real OpenSSH client.
"""

from __future__ import annotations

import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import docker
import pexpect

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
        if comm == "python3":  # forked by her session launcher, which runc started
            assert _is_launcher(ppid)
            ppid, comm = _host_parent(ppid)
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


def _is_launcher(pid: int) -> bool:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:5] == \
        [b"python3", b"-I", b"-S", b"-", b"dgw-launcher"]


def test_later_sessions_are_forked_by_her_launcher_as_docker_exec_makes_them(
        make_gateway, docker_client: docker.DockerClient) -> None:
    """After her first session a launcher runs in her container (launcher.py, started through
    runc); her next non-terminal sessions are its children and, to the kernel, the same
    process a `docker exec -u alice` makes (user, groups, capabilities, seccomp, cgroup,
    namespaces, AppArmor, umask, rlimits).  She can kill it: her sessions then start through
    runc again, and her container's next start gets a new one."""
    gw = make_gateway()
    gw.start()
    assert gw.ssh("alice", "true").returncode == 0
    assert wait_for(lambda: "session launcher of alice ready" in gw.log.read_text(), 30), \
        gw.log.read_text()[-3000:]
    container = docker_client.containers.get(gw.container_name("alice"))
    r = gw.ssh("alice", PROBE)
    assert r.returncode == 0, r.stderr
    assert gw.log.read_text().count("forked by her launcher") == 1
    code, engine = container.exec_run(["sh", "-c", PROBE], user="alice")
    assert code == 0, engine
    assert r.stdout.decode().splitlines() == engine.decode().splitlines()
    status = dict(line.split(":", 1) for line in r.stdout.decode().splitlines()
                  if line.startswith(("Uid", "CapEff")))
    assert status["Uid"].split()[0] != "0" and int(status["CapEff"], 16) == 0

    # seen from the host: her process -> the launcher -> runc -> the gateway; her cgroups
    n = random.randrange(10_000, 90_000) * 10 + 9
    client = subprocess.Popen(gw.ssh_args("alice") + [f"exec sleep {n}"], stdin=subprocess.PIPE)
    try:
        def found() -> list[int]:
            out = subprocess.run(["pgrep", "-f", f"^sleep {n}$"], capture_output=True,
                                 text=True).stdout
            return [int(p) for p in out.split()]
        assert wait_for(found, 60)
        launcher, comm = _host_parent(found()[0])
        assert comm == "python3" and _is_launcher(launcher)
        runc, comm = _host_parent(launcher)
        assert comm == "runc" and _host_parent(runc)[0] == gw.proc.pid
        init = container.attrs["State"]["Pid"]
        assert Path(f"/proc/{found()[0]}/cgroup").read_text() == \
            Path(f"/proc/{init}/cgroup").read_text()
    finally:
        client.kill()
        client.wait(10)
    # what she sees of it, and what happens when she kills it
    r = gw.ssh("alice", "ps -eo args | grep -c '^python3 -I -S - dgw-launcher$'; "
                        "pkill -f '^python3 -I -S - dgw-launcher$'; true")
    assert r.stdout == b"1\n", r.stdout
    assert wait_for(lambda: "session launcher of alice ended" in gw.log.read_text(), 20)
    forked = gw.log.read_text().count("forked by her launcher")
    r = gw.ssh("alice", "echo still")
    assert r.returncode == 0 and r.stdout == b"still\n", r.stderr
    assert gw.log.read_text().count("forked by her launcher") == forked  # through runc
    container.restart(timeout=20)
    assert gw.ssh("alice", "true").returncode == 0
    assert wait_for(lambda: gw.log.read_text().count("session launcher of alice ready") == 2,
                    60)
    assert gw.ssh("alice", "true").returncode == 0
    assert gw.log.read_text().count("forked by her launcher") == forked + 1


def test_her_limits_are_the_engines_not_the_gateways(
        make_gateway, docker_client: docker.DockerClient) -> None:
    """rlimits the container's spec leaves out are inherited: a `docker exec` gets the
    engine's, so a session must too, whatever the gateway runs with (under systemd its core
    size is 0, dockerd's unlimited; found on the modern host).  The gateway here starts with
    a smaller stack and no core files; through runc and through her launcher she gets the
    engine's."""
    gw = make_gateway()
    probe = "ulimit -Ss; ulimit -Sc"
    saved = {r: resource.getrlimit(r) for r in (resource.RLIMIT_STACK, resource.RLIMIT_CORE)}
    resource.setrlimit(resource.RLIMIT_STACK, (4096 * 1024, saved[resource.RLIMIT_STACK][1]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, saved[resource.RLIMIT_CORE][1]))
    try:
        gw.start()  # inherits them
    finally:
        for r, limits in saved.items():
            resource.setrlimit(r, limits)
    first = gw.ssh("alice", probe)  # through runc: her launcher starts beside it
    assert first.returncode == 0, first.stderr
    container = docker_client.containers.get(gw.container_name("alice"))
    code, engine = container.exec_run(["sh", "-c", probe], user="alice")
    assert code == 0 and engine.split()[0] != b"4096", engine
    assert first.stdout == engine
    assert wait_for(lambda: "session launcher of alice ready" in gw.log.read_text(), 30)
    launched = gw.ssh("alice", probe)
    assert "forked by her launcher" in gw.log.read_text()
    assert launched.stdout == engine


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


# --- a pty login served by a pre-started terminal spare ------------------------------------

TERM_SPARE = "read -r dgw_h <&3"  # in the command line of a waiting terminal spare (spares.py)
FIRST = re.compile(r"S=(\d+ \d+)= T=(\S+)= E=(\S*)= P=(\d+)=")


def _terminal_spares(container_id: str) -> list[tuple[int, int]]:
    """(host PID, its parent's) of each terminal spare waiting in this container."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            if TERM_SPARE not in cmd or container_id not in (d / "cgroup").read_text():
                continue
            out.append((int(d.name), _host_parent(int(d.name))[0]))
        except (OSError, ValueError):
            continue
    return out


def _ns_pid(pid: int) -> int:
    """A host PID as her container's PID namespace numbers it."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("NSpid:")).split()[-1])


PTY_PROMPT = "DGW-PROMPT> "


def _pty_login(gw: GatewayProc, tag: str, rows: int, cols: int) -> dict[str, str]:
    """An interactive login (real ssh -tt): what its first command saw, then her shell's
    state written to files tag.* (read back by the caller); Ctrl-C, a resize and `exit 7`."""
    args = gw.ssh_args("alice", None, "-tt")
    child = pexpect.spawn(args[0], args[1:], dimensions=(rows, cols), timeout=60,
                          encoding="utf-8", codec_errors="replace",
                          env={**os.environ, "TERM": "xterm-256color"})
    try:
        child.sendline('echo "S=$(stty size)= T=$(tty)= E=$TERM= P=$$="')
        child.expect(FIRST)
        first = dict(zip("stEp", child.match.groups(), strict=True))
        child.sendline("bind 'set enable-bracketed-paste off'; export PS1='DGW''-PROMPT> '")
        child.expect_exact(PTY_PROMPT)
        child.sendline(f"sh ~/probe.sh > ~/{tag}.probe; stty -a > ~/{tag}.stty; "
                       f"env | sort > ~/{tag}.env; echo WROTE-$((40+2))")
        child.expect_exact("WROTE-42")
        child.expect_exact(PTY_PROMPT)
        child.sendline("sh -c 'echo SLEEP''ING; exec sleep 100'")  # Ctrl-C reaches it
        child.expect_exact("SLEEPING")
        child.sendcontrol("c")
        child.expect_exact(PTY_PROMPT)
        child.sendline("echo rc=$?")
        child.expect(r"rc=(\d+)")
        first["ctrl-c"] = child.match.group(1)
        child.setwinsize(rows + 7, cols + 9)  # a live resize reaches her shell
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            child.sendline('echo "R=$(stty size)="')
            if child.expect([rf"R={rows + 7} {cols + 9}=", pexpect.TIMEOUT], timeout=2) == 0:
                break
        else:
            raise AssertionError("the resize never reached her shell")
        child.sendline("exit 7")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    first["status"] = str(child.exitstatus)
    return first


def _state(gw: GatewayProc, tag: str) -> dict[str, str]:
    r = gw.ssh("alice", f"cat ~/{tag}.probe; echo ===; cat ~/{tag}.stty; echo ===; "
               f"grep -v -e '^SSH_CLIENT=' -e '^SSH_CONNECTION=' -e '^SSH_TTY=' ~/{tag}.env")
    assert r.returncode == 0, r.stderr
    probe, stty, env = r.stdout.decode().split("===\n")
    return {"probe": probe, "stty": stty, "env": env}


def test_a_pty_login_is_served_by_a_terminal_spare_as_a_fresh_one(
        make_gateway, docker_client: docker.DockerClient) -> None:
    """After an interactive session a terminal spare waits (runc started before the login);
    the next pty login is that very process, and to her it is a fresh one: its first command
    sees the client's size, a pty and the client's TERM; the same user, groups, capabilities,
    seccomp, cgroup, namespaces, terminal modes and environment; Ctrl-C, resize, exit status,
    recording; `kill -TERM $$` ends it with exit-signal (ssh: 255); a 100 kB command runs;
    what she left after a hang-up is killed by its PID file."""
    gw = make_gateway()
    users = gw.default_users()
    users["alice"]["record"] = True
    gw.write_users(users)
    gw.start()
    r = gw.ssh("alice", "cat > probe.sh", input=PROBE.encode())
    assert r.returncode == 0, r.stderr
    cid = docker_client.containers.get(gw.container_name("alice")).id
    assert _terminal_spares(cid) == []  # none before her first interactive session
    casts = gw.dir / "state" / "recordings" / "alice"

    fresh = _pty_login(gw, "fresh", 33, 111)
    assert gw.log.read_text().count("from a spare (runc") == 0
    assert wait_for(lambda: len(_terminal_spares(cid)) == 1, 20), _terminal_spares(cid)
    (spare, runc), = _terminal_spares(cid)
    assert Path(f"/proc/{runc}/comm").read_text().strip() == "runc"
    assert _host_parent(runc)[0] == gw.proc.pid
    spare_ns = _ns_pid(spare)  # her shell will be this very process
    before = set(casts.glob("*.cast"))

    served = _pty_login(gw, "spare", 33, 111)
    assert f"from a spare (runc {runc}, terminal)" in gw.log.read_text()
    assert served["p"] == str(spare_ns), (served, spare_ns)
    assert (served["s"], served["E"], served["ctrl-c"], served["status"]) == \
        ("33 111", "xterm-256color", "130", "7"), served
    assert served["t"].startswith("/dev/pts/")
    assert {k: v for k, v in fresh.items() if k not in "tp"} == \
        {k: v for k, v in served.items() if k not in "tp"}
    want, got = _state(gw, "fresh"), _state(gw, "spare")
    assert got["probe"] == want["probe"]
    assert "Seccomp:" in got["probe"] and "\ncgroup\n" in got["probe"], got["probe"]
    assert got["stty"] == want["stty"] and "rows 33; columns 111" in got["stty"], got["stty"]
    assert got["env"] == want["env"] and "TERM=xterm-256color\n" in got["env"]
    cast = set(casts.glob("*.cast")) - before
    assert len(cast) == 1 and "WROTE-42" in cast.pop().read_text()

    # a pty command, from the next spare: killed by a signal as under sshd, exit status kept,
    # and a command far longer than a terminal line (its header is not typed at her terminal)
    long = "echo " + "x" * 100_000 + " | wc -c"
    for command, code in (("kill -TERM $$", 255), ("exit 3", 3), (long, 0)):
        assert wait_for(lambda: len(_terminal_spares(cid)) == 1, 20)
        n = gw.log.read_text().count("from a spare (runc")
        r = gw.ssh("alice", command, opts=("-tt",))
        assert r.returncode == code, (command[:40], r.stderr)
        assert gw.log.read_text().count("from a spare (runc") == n + 1, command[:40]
    assert r.stdout == b"100001\r\n", r.stdout[:200]

    # a hang-up: the client killed, what ignores SIGHUP is killed by her session's PID file
    assert wait_for(lambda: len(_terminal_spares(cid)) == 1, 20)
    n = random.randrange(10_000, 90_000) * 10 + 3
    client = subprocess.Popen(gw.ssh_args("alice", None, "-tt") +
                              [f"trap '' HUP; sleep {n}; true"], stdin=subprocess.PIPE)
    try:
        def sleeping() -> bool:
            return gw.ssh("alice", f"pgrep -f 'slee[p] {n}$' >/dev/null").returncode == 0
        assert wait_for(sleeping, 30)
        assert gw.log.read_text().count("from a spare (runc") >= 4
        client.kill()
        assert wait_for(lambda: not sleeping(), 30), "a hung-up session outlived its grace"
        assert "killed the leftover session process" in gw.log.read_text()
    finally:
        client.kill()
        client.wait(10)
        gw.ssh("alice", f"pkill -f 'slee[p] {n}$'; true")


def _quick_pty(gw: GatewayProc, user: str) -> str:
    """A short interactive login; who her shell ran as."""
    args = gw.ssh_args(user, None, "-tt")
    child = pexpect.spawn(args[0], args[1:], timeout=60, encoding="utf-8",
                          codec_errors="replace")
    try:
        child.sendline('echo "W=$(id -un)="')
        child.expect(r"W=(\w+)=")
        who = child.match.group(1)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    return who


def test_terminal_spares_are_hers_and_go_with_her_container(
        make_gateway, docker_client: docker.DockerClient) -> None:
    """A terminal spare serves only its user; it is dropped when the gateway stops her
    container (its runc ends) and is not used after her container restarted under it."""
    gw = make_gateway()
    gw.start()
    for user in ("alice", "bob"):
        assert gw.ssh(user, "true").returncode == 0
    alice = docker_client.containers.get(gw.container_name("alice"))
    assert _quick_pty(gw, "alice") == "alice"
    assert wait_for(lambda: len(_terminal_spares(alice.id)) == 1, 20)
    assert _quick_pty(gw, "bob") == "bob"  # his own fresh process, never hers
    assert gw.log.read_text().count("from a spare (runc") == 0
    assert len(_terminal_spares(alice.id)) == 1

    # her container restarted behind the gateway's back: the spare died with it
    alice.restart(timeout=20)
    assert wait_for(lambda: _terminal_spares(alice.id) == [], 20)
    assert _quick_pty(gw, "alice") == "alice"
    assert gw.log.read_text().count("from a spare (runc") == 0
    assert wait_for(lambda: len(_terminal_spares(alice.id)) == 1, 20)
    (_, runc), = _terminal_spares(alice.id)

    # the gateway stops her container (admin stop, idle cull): its spares go first
    r = subprocess.run([sys.executable, "-m", "gateway", "stop", "alice", "--config",
                        str(gw.config)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: not Path(f"/proc/{runc}").exists(), 20)
    assert _quick_pty(gw, "alice") == "alice"  # her container started again
    assert gw.log.read_text().count("from a spare (runc") == 0
