"""Issue 2, end to end: real `ssh` against a real gateway and a real Docker engine."""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import docker
import pexpect
import pytest

from .conftest import GatewayProc, pubkey, wait_for

PROMPT = "DGW-PROMPT> "


def login_pty(gw: GatewayProc, user: str, rows: int = 24, cols: int = 80) -> pexpect.spawn:
    """Interactive login through a real pty, with a prompt we can match reliably."""
    args = gw.ssh_args(user, None, "-tt")
    child = pexpect.spawn(args[0], args[1:], dimensions=(rows, cols), timeout=120,
                          encoding="utf-8", codec_errors="replace")
    child.sendline("bind 'set enable-bracketed-paste off'; export PS1='DGW''-PROMPT> '")
    child.expect_exact(PROMPT)
    return child


def run_pty(child: pexpect.spawn, command: str, timeout: float = 120) -> str:
    """Run one command at the prompt; its output, found between the echo and an end marker."""
    child.sendline(f"{command}; echo __DGW''END__")
    child.expect_exact("__DGWEND__", timeout=timeout)
    out = child.before.replace("\r\n", "\n")
    child.expect_exact(PROMPT, timeout=timeout)
    return out.split("__DGW''END__\n", 1)[-1]


def warm(gw: GatewayProc, user: str) -> None:
    r = gw.ssh(user, "true")
    assert r.returncode == 0, r.stderr


def test_exec_streams_exit_code_and_env(gateway: GatewayProc) -> None:
    first = gateway.ssh("alice", "echo out; echo err >&2; exit 3")
    assert first.returncode == 3, first.stderr
    assert first.stdout == b"out\n"
    assert first.stderr.endswith(b"err\n")
    r = gateway.ssh("alice", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    # killed by a signal: exit-signal, as sshd sends it, and OpenSSH's ssh exits 255
    for cmd, code in (("true", 0), ("false", 1), ("no-such-command-xyz", 127),
                      ("exit 130", 130), ("kill -INT $$", 255)):
        assert gateway.ssh("alice", cmd).returncode == code, cmd
    r = gateway.ssh("alice", 'echo "$DOCKER_HOST|$USER|$HOME|$LOGNAME|$(pwd)|$(id -un)"')
    assert r.stdout.decode().strip() == ("unix:///var/run/docker.sock|alice|/home/alice|alice|"
                                         "/home/alice|alice")


def test_first_login_progress_on_stderr_only(gateway: GatewayProc) -> None:
    r = gateway.ssh("dave", "echo hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"hello\n"
    assert re.search(rb"Starting your Docker environment.* ready in \d+\.\d s", r.stderr), r.stderr


def test_client_environment_filtered(gateway: GatewayProc) -> None:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_TIME": "C", "SECRET_X": "leak",
           "TERM": "xterm-from-client"}
    r = subprocess.run([*gateway.ssh_args("alice", None, "-o", "SendEnv=LANG LC_* SECRET_X TERM"),
                        'echo "$LANG|$LC_TIME|${SECRET_X:-none}|${TERM:-noterm}"'],
                       capture_output=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    # without a pty no TERM is passed (bash then says "dumb", as under OpenSSH's sshd)
    assert r.stdout.decode().strip() == "C.UTF-8|C|none|dumb", r.stderr


def test_stdin_streams_to_eof_tar_roundtrip(gateway: GatewayProc, tmp_path: Path) -> None:
    src = tmp_path / "proj"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello\n")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4096)
    tar = subprocess.run(["tar", "-C", str(src), "-c", "."], capture_output=True,
                         check=True).stdout
    r = gateway.ssh("alice", "rm -rf proj && mkdir proj && tar x -C proj && echo done",
                    input=tar)
    assert r.returncode == 0 and r.stdout == b"done\n", r.stderr
    r = gateway.ssh("alice", "cd proj && sha256sum a.txt sub/b.bin")
    want = {p: hashlib.sha256((src / p).read_bytes()).hexdigest() for p in ("a.txt", "sub/b.bin")}
    got = dict(reversed(line.split()) for line in r.stdout.decode().splitlines())
    assert got == want
    # binary-clean both ways: stdout carries exactly the bytes
    r = gateway.ssh("alice", "cat proj/sub/b.bin")
    assert r.stdout == (src / "sub" / "b.bin").read_bytes()


def test_pty_shell_docker_build_and_run(gateway: GatewayProc) -> None:
    child = login_pty(gateway, "alice", rows=30, cols=100)
    try:
        assert run_pty(child, "echo $DOCKER_HOST").strip() == "unix:///var/run/docker.sock"
        assert run_pty(child, "stty size").strip() == "30 100"
        assert run_pty(child, "tty").strip().startswith("/dev/pts/")
        out = run_pty(child, "rm -rf b && mkdir b && cp /usr/bin/tini-static b/ && printf "
                      "'FROM scratch\\nCOPY tini-static /tini\\n"
                      "ENTRYPOINT [\"/tini\",\"--version\"]\\n' > b/Dockerfile && "
                      "docker build -q -t alice-secret b >/dev/null && "
                      "docker run --rm alice-secret; echo rc=$?", timeout=180)
        assert "tini version" in out and "rc=0" in out, out
        # live resize reaches the shell
        child.setwinsize(40, 120)
        deadline = time.monotonic() + 10
        while (size := run_pty(child, "stty size").strip()) != "40 120" and \
                time.monotonic() < deadline:
            pass  # the window-change travels on its own; ask again until it has arrived
        assert size == "40 120"
        # Ctrl-C reaches the foreground process (once it runs: it says so first)
        child.sendline("sh -c 'echo SLEEP''ING; exec sleep 100'")
        child.expect_exact("SLEEPING", timeout=30)
        child.sendcontrol("c")
        child.expect_exact(PROMPT, timeout=10)
        assert run_pty(child, "echo rc=$?").strip() == "rc=130"
        child.sendline("exit 7")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close()
    assert child.exitstatus == 7


def test_users_are_isolated(gateway: GatewayProc, docker_client: docker.DockerClient) -> None:
    warm(gateway, "alice")
    warm(gateway, "bob")
    a = docker_client.containers.get(gateway.container_name("alice"))
    b = docker_client.containers.get(gateway.container_name("bob"))
    assert a.id != b.id
    # two daemons: different IDs
    ida = gateway.ssh("alice", "docker info -f '{{.ID}}'").stdout.strip()
    idb = gateway.ssh("bob", "docker info -f '{{.ID}}'").stdout.strip()
    assert ida and idb and ida != idb
    gateway.ssh("alice", "docker tag $(docker images -q | head -1) alice-only:1 || "
                "(mkdir -p t && cp /usr/bin/tini-static t/ && printf 'FROM scratch\\nCOPY "
                "tini-static /t\\n' > t/Dockerfile && docker build -q -t alice-only:1 t)")
    assert b"alice-only" in gateway.ssh("alice", "docker images").stdout
    assert b"alice-only" not in gateway.ssh("bob", "docker images").stdout
    # networks: bob cannot reach a service listening in alice's container
    a.reload()
    nets = a.attrs["NetworkSettings"]["Networks"]
    assert list(nets) == [gateway.container_name("alice")]
    ip = next(iter(nets.values()))["IPAddress"]
    a.exec_run(["sh", "-c", "python3 -m http.server 8765 >/dev/null 2>&1 &"], detach=True)
    def up() -> bool:
        ok = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "--max-time", "5", f"http://{ip}:8765/"], capture_output=True,
                            text=True)
        return ok.stdout == "200"
    deadline = time.monotonic() + 30
    while not up() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert up()  # the service is really up, seen from the host
    r = gateway.ssh("bob", f"curl -s -o /dev/null --max-time 3 http://{ip}:8765/; echo rc=$?")
    assert r.stdout.decode().strip() != "rc=0"
    # no host docker socket in any user container
    mounts = [m["Destination"] for m in a.attrs["Mounts"]]
    assert "/var/run/docker.sock" not in mounts and sorted(mounts) == ["/home/alice",
                                                                        "/var/lib/docker"]


def test_reuse_and_racing_first_logins(gateway: GatewayProc,
                                       docker_client: docker.DockerClient) -> None:
    warm(gateway, "alice")
    before = docker_client.containers.get(gateway.container_name("alice")).id
    warm(gateway, "alice")
    assert docker_client.containers.get(gateway.container_name("alice")).id == before
    # ten racing first logins of a brand-new user make exactly one container
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: gateway.ssh("carol", "hostname"), range(10)))
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    owned = docker_client.containers.list(all=True, filters={
        "label": [f"dind-gateway.instance={gateway.prefix}", "dind-gateway.owner=carol"]})
    assert len(owned) == 1
    assert {r.stdout for r in results} == {b"carol-devbox\n"}


def test_limits_visible_outside_and_inside(gateway: GatewayProc,
                                           docker_client: docker.DockerClient) -> None:
    warm(gateway, "bob")
    hc = docker_client.containers.get(gateway.container_name("bob")).attrs["HostConfig"]
    assert hc["Memory"] == 1 << 30 and hc["MemorySwap"] == 1 << 30
    assert hc["PidsLimit"] == 1000 and hc["NanoCpus"] == 1_000_000_000
    # the default rootless profile: Docker's set dropped, six capabilities for the init only
    assert hc["Privileged"] is False and hc["CapDrop"] == ["ALL"]
    assert set(hc["CapAdd"]) == {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL"}
    r = gateway.ssh("bob", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || "
                    "cat /sys/fs/cgroup/memory.max; cat /sys/fs/cgroup/pids/pids.max 2>/dev/null"
                    " || cat /sys/fs/cgroup/pids.max")
    assert r.stdout.split() == [b"1073741824", b"1000"], r.stderr


def test_recreated_container_keeps_home(gateway: GatewayProc,
                                        docker_client: docker.DockerClient) -> None:
    assert gateway.ssh("erin", "echo keep-me > note.txt").returncode == 0
    old = docker_client.containers.get(gateway.container_name("erin"))
    old.remove(force=True)
    r = gateway.ssh("erin", "cat note.txt; stat -c %U note.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"keep-me\nerin\n"
    assert docker_client.containers.get(gateway.container_name("erin")).id != old.id


def test_refused_logins(make_gateway, keys: dict[str, Path]) -> None:
    gw = make_gateway()
    gw.write_users({
        "alice": {"keys": [pubkey(keys["alice"])]},
        "bob": {"keys": [f'expiry-time="20200101" {pubkey(keys["bob"])}']},
        "carol": {"keys": [f'from="10.99.99.99" {pubkey(keys["carol"])}']},
        "dave": {"keys": [pubkey(keys["dave"])], "disabled": True},
        "erin": {"keys": [f'from="127.0.0.0/8",expiry-time="29991231" {pubkey(keys["erin"])}']},
    })
    gw.start()
    cases = {"nobody": "alice", "alice": "other", "bob": None, "carol": None, "dave": None}
    for user, key in cases.items():
        r = gw.ssh(user, "true", key=key)
        assert r.returncode == 255 and b"Permission denied" in r.stderr, (user, r.stderr)
    # unknown user and wrong key look the same to the client
    a = gw.ssh("nobody", "true", key="alice").stderr
    b = gw.ssh("alice", "true", key="other").stderr
    assert a.replace(b"nobody", b"X") == b.replace(b"alice", b"X")
    log = gw.tail(200)
    for user, reason in (("nobody", "unknown user"), ("alice", "key not authorized"),
                         ("bob", "key expired"), ("carol", "from= does not match"),
                         ("dave", "disabled user")):
        assert re.search(rf"auth failed: user={user} peer=127\.0\.0\.1 key=SHA256:\S+ "
                         rf"reason={reason}", log), (user, log)
    # erin's from= and future expiry allow her in (no container needed for a refusal check)
    r = gw.ssh("erin", "true")
    assert r.returncode == 0, r.stderr


def test_no_pty_and_forced_command(make_gateway, keys: dict[str, Path]) -> None:
    gw = make_gateway()
    gw.write_users({
        "alice": {"keys": [f'no-pty,environment="PROJ=x1" {pubkey(keys["alice"])}']},
        "bob": {"keys": [f'command="echo forced:$SSH_ORIGINAL_COMMAND" {pubkey(keys["bob"])}']},
        "carol": {"keys": [f'restrict {pubkey(keys["carol"])}']},
    })
    gw.start()
    # the pty request is refused (OpenSSH's client then gives up when -tt forces one)
    for user in ("alice", "carol"):
        r = gw.ssh(user, "tty", opts=("-tt",))
        assert b"PTY allocation request failed" in r.stderr and b"/dev/pts" not in r.stdout, r
    r = gw.ssh("alice", "tty; echo $PROJ")
    assert r.stdout == b"not a tty\nx1\n", r
    r = gw.ssh("bob", "whoami")
    assert r.stdout == b"forced:whoami\n", r.stderr


def test_bad_users_yaml_refuses_to_start(tmp_path: Path, keys: dict[str, Path]) -> None:
    gw = GatewayProc(tmp_path, keys)
    gw.users_file.write_text("users:\n  alice:\n    memory: 4x\n    keys: []\n")
    gw.config.write_text(f"listen: 127.0.0.1:{gw.port}\nusers_file: users.yaml\n"
                         "state_dir: state\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(gw.config)],
                       capture_output=True, text=True, timeout=30,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode != 0
    assert f"{gw.users_file}:3" in r.stderr and "memory" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def broken_images(docker_client: docker.DockerClient):
    """Derived images whose inner daemon crashes, or never answers."""
    from .conftest import IMAGE
    suffix = secrets.token_hex(3)  # concurrent runs must not share (or delete) each other's
    tags = {"crash": f"dgwtest/crash:{suffix}", "hang": f"dgwtest/hang:{suffix}"}
    entry = {"crash": '["/bin/sh","-c","echo dockerd: simulated failure XYZ >&2; exit 3"]',
             "hang": '["/bin/sh","-c","echo starting forever; exec sleep 1000"]'}
    import io
    for kind, tag in tags.items():
        df = f"FROM {IMAGE}\nENTRYPOINT {entry[kind]}\n".encode()
        docker_client.images.build(fileobj=io.BytesIO(df), tag=tag, rm=True)
    yield tags
    for tag in tags.values():
        docker_client.images.remove(tag, force=True)


@pytest.mark.parametrize("kind,expect", [("crash", "simulated failure XYZ"),
                                         ("hang", "did not become ready within 3 s")])
def test_daemon_failure_is_explained(make_gateway, broken_images, kind: str,
                                     expect: str) -> None:
    gw = make_gateway(image=broken_images[kind], ready_timeout=3)
    gw.start()
    r = gw.ssh("alice", "true")
    assert r.returncode != 0 and r.returncode != 255
    assert expect in r.stderr.decode(), r.stderr
    assert gw.proc is not None and gw.proc.poll() is None  # the gateway keeps serving


def test_user_networks_come_from_the_pool(gateway: GatewayProc,
                                          docker_client: docker.DockerClient) -> None:
    """Docker's default pools hold ~30 bridges; ours gives each user a /28 of its own pool."""
    import asyncio
    import ipaddress

    from gateway.backend import BackendError
    from gateway.backend.docker import DockerBackend, DockerClient

    from .conftest import remove_labelled

    warm(gateway, "alice")
    net = docker_client.networks.get(gateway.container_name("alice"))
    subnet = ipaddress.ip_network(net.attrs["IPAM"]["Config"][0]["Subnet"])
    assert subnet.prefixlen == 28 and subnet.subnet_of(ipaddress.ip_network("10.213.0.0/16"))

    prefix = f"dgwn{secrets.token_hex(3)}"
    backend = DockerBackend(DockerClient(), image="unused", prefix=prefix,
                            network_pool="10.215.77.0/24")

    async def fill() -> list[str]:
        for i in range(16):  # a /24 holds sixteen /28s ...
            await backend._create_network(f"u{i}")
        await backend._create_network("u3")  # idempotent
        with pytest.raises(BackendError, match="10.215.77.0/24 is full") as info:
            await backend._create_network("u16")  # ... and no seventeenth
        assert "tell your admin" in info.value.user_message
        return [n.attrs["IPAM"]["Config"][0]["Subnet"] for n in docker_client.networks.list(
            filters={"label": f"dind-gateway.instance={prefix}"})]

    try:
        subnets = asyncio.run(fill())
        assert len(subnets) == len(set(subnets)) == 16
    finally:
        remove_labelled(docker_client, prefix)


def test_asyncssh_client_exec_signal_and_terminal(gateway: GatewayProc,
                                                  keys: dict[str, Path]) -> None:
    """The same paths with asyncssh as the client: signals (OpenSSH cannot send them)."""
    import asyncio

    import asyncssh

    warm(gateway, "alice")

    async def scenario() -> None:
        key = asyncssh.read_private_key(str(keys["alice"]))
        async with asyncssh.connect("127.0.0.1", gateway.port, username="alice",
                                    client_keys=[key], known_hosts=None) as conn:
            r = await conn.run("echo o; echo e >&2; exit 5", encoding=None)
            assert (r.exit_status, r.stdout, r.stderr) == (5, b"o\n", b"e\n")
            proc = await conn.create_process("echo ready; exec sleep 100")
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == "ready\n"
            proc.send_signal("INT")
            await asyncio.wait_for(proc.wait_closed(), 15)
            assert proc.exit_signal is not None and proc.exit_signal[0] == "INT", \
                (proc.exit_status, proc.exit_signal)
            proc = await conn.create_process(
                "stty -echo; stty size; echo $TERM; while read x; do stty size; done",
                term_type="xterm-256color", term_size=(101, 33))
            first = [await asyncio.wait_for(proc.stdout.readline(), 30) for _ in range(2)]
            assert [ln.split() for ln in first] == [["33", "101"], ["xterm-256color"]], first
            proc.change_terminal_size(120, 40)
            # the resize and the next line travel apart: ask until the new size shows
            for _ in range(50):
                proc.stdin.write("\n")
                size = (await asyncio.wait_for(proc.stdout.readline(), 30)).split()
                if size == ["40", "120"]:
                    break
            assert size == ["40", "120"], size
            proc.stdin.write("\x04")
            await asyncio.wait_for(proc.wait_closed(), 15)

    asyncio.run(scenario())


TRICKY = "printf '%s|' \"a'b\" 'c  d' \"$(printf 'x\\ny')\" \"$LANG\"; head -c 5; echo"


def _tricky_exec(gateway: GatewayProc) -> None:
    r = subprocess.run([*gateway.ssh_args("bob", None, "-o", "SendEnv=LANG"), TRICKY],
                       input=b"12345rest", capture_output=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a'b|c  d|x\ny|C.UTF-8|12345\n"
    assert r.stderr == b""


def test_her_launcher_serves_the_next_exec_with_exact_argv_env_and_stdin(
        make_gateway, docker_client: docker.DockerClient) -> None:
    """On the direct path, once her session launcher answers (launcher.py), it forks her next
    non-terminal sessions: exact argv, env and stdin; and no non-terminal spare waits then."""
    gateway = make_gateway(process_path="direct")
    gateway.start()
    warm(gateway, "bob")
    assert wait_for(lambda: "session launcher of bob ready" in gateway.log.read_text(), 30)
    _tricky_exec(gateway)
    assert gateway.log.read_text().count("session of bob forked by her launcher") == 1
    c = docker_client.containers.get(gateway.container_name("bob"))
    out = c.exec_run(["ps", "-eo", "pid,args"]).output.decode()
    assert [ln for ln in out.splitlines() if "read -r dgw_h" in ln] == []


@pytest.mark.parametrize("path", ["direct", "engine"])
def test_prestarted_process_serves_the_next_exec(make_gateway, path: str,
                                                 docker_client: docker.DockerClient) -> None:
    """On either process path: after a session one spare waits; the next exec uses it with
    exact argv, env and stdin.  (The direct path uses spares while her launcher does not
    answer: here she killed it.)"""
    gateway = make_gateway(process_path=path)
    gateway.start()
    warm(gateway, "bob")
    c = docker_client.containers.get(gateway.container_name("bob"))
    if path == "direct":
        assert wait_for(lambda: "session launcher of bob ready" in gateway.log.read_text(), 30)
        warm(gateway, "bob")  # forked by it: no spare is made after it
        c.exec_run(["pkill", "-f", "^python3 -I -S - dgw-launcher$"], user="bob")
        assert wait_for(lambda: "session launcher of bob ended" in gateway.log.read_text(), 20)
        warm(gateway, "bob")  # through runc: a spare is made after it

    def spares() -> list[str]:
        out = c.exec_run(["ps", "-eo", "pid,args"]).output.decode()
        return [ln for ln in out.splitlines() if "read -r dgw_h" in ln]

    deadline = time.monotonic() + 10
    while len(spares()) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    before = spares()
    assert len(before) == 1, before
    _tricky_exec(gateway)
    deadline = time.monotonic() + 10
    while (len(spares()) != 1 or spares() == before) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = spares()
    assert len(after) == 1 and after != before  # used, then replaced: never more than one
