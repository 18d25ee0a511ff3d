"""Issue 5: ssh -L into your own services, idle culling, restarts, max_sessions."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import threading
from pathlib import Path

import docker
import pytest

from .conftest import GatewayProc, container_status, free_port, processes, pubkey, wait_for

# Inner images built from files already in the DinD image (no registry anywhere).
PYWEB = ("tar -ch usr/bin/python3.11 usr/lib/python3.11 --exclude=usr/lib/python3.11/test "
         "$(ldd /usr/bin/python3.11 | grep -o '/[^ ]*' | sed 's,^/,,') -C / 2>/dev/null "
         "| docker import - pyweb >/dev/null")
SLEEPER = ("cd / && tar -ch usr/bin/sleep $(ldd /usr/bin/sleep | grep -o '/[^ ]*' | "
           "sed 's,^/,,') 2>/dev/null | docker import - sleeper >/dev/null")


def forward_attempt(gw: GatewayProc, user: str, dest: str) -> bytes:
    """Open `ssh -N -L` to dest, push connections through it; ssh's stderr."""
    port = free_port()
    tunnel = subprocess.Popen([*gw.ssh_args(user, None, "-o", "LogLevel=INFO", "-N", "-L",
                                           f"127.0.0.1:{port}:{dest}")],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    err = bytearray()
    reader = threading.Thread(target=_collect, args=(tunnel.stderr, err), daemon=True)
    reader.start()
    try:
        # curl exits 7 until ssh listens locally; each later try opens a channel, and ssh
        # reports the gateway's answer on stderr
        wait_for(lambda: subprocess.run(["curl", "-s", "--max-time", "3", url],
                                        capture_output=True).returncode != 7, 20)
        wait_for(lambda: b"open failed" in err, 10)
    finally:
        tunnel.terminate()
        tunnel.wait(10)
        reader.join(10)
    return bytes(err)


def _collect(stream, into: bytearray) -> None:
    """Everything a pipe delivers, line by line, as it comes."""
    for line in iter(stream.readline, b""):
        into.extend(line)


def test_local_forward_reaches_inner_published_port(gateway: GatewayProc) -> None:
    r = gateway.ssh("bob", f"cd / && {PYWEB} && docker rm -f web >/dev/null 2>&1; "
                    "docker run -d --name web -p 8080:80 -w /usr pyweb "
                    "/usr/bin/python3.11 -m http.server 80", timeout=300)
    assert r.returncode == 0, r.stderr
    port = free_port()
    tunnel = subprocess.Popen([*gateway.ssh_args("bob", None, "-N", "-L",
                                                 f"127.0.0.1:{port}:localhost:8080")],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def fetch() -> bool:
            out = subprocess.run(["curl", "-s", "--max-time", "3", f"http://127.0.0.1:{port}/"],
                                 capture_output=True)
            return b"Directory listing" in out.stdout
        assert wait_for(fetch, 30), tunnel.stderr
    finally:
        tunnel.terminate()
        tunnel.wait(10)


@pytest.mark.parametrize("dest", ["{other}:22", "{other_ip}:8080", "172.17.0.1:2375",
                                  "example.com:80"])
def test_forward_elsewhere_is_refused(gateway: GatewayProc, docker_client: docker.DockerClient,
                                      dest: str) -> None:
    assert gateway.ssh("carol", "true").returncode == 0
    other = docker_client.containers.get(gateway.container_name("carol"))
    ip = next(iter(other.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
    target = dest.format(other=gateway.container_name("carol"), other_ip=ip)
    err = forward_attempt(gateway, "dave", target)
    assert b"administratively prohibited" in err and b"not allowed" in err, err


def test_key_without_port_forwarding_is_refused(make_gateway, keys: dict[str, Path]) -> None:
    gw = make_gateway()
    gw.write_users({"alice": {"keys": [f"no-port-forwarding {pubkey(keys['alice'])}"]},
                    "bob": {"keys": [f'permitopen="localhost:9000" {pubkey(keys["bob"])}']}})
    gw.start()
    err = forward_attempt(gw, "alice", "localhost:8080")
    assert b"port forwarding is disabled" in err, err
    err = forward_attempt(gw, "bob", "localhost:8080")
    assert b"not in this key's permitopen" in err, err


def test_max_sessions(make_gateway, keys: dict[str, Path],
                      docker_client: docker.DockerClient) -> None:
    gw = make_gateway()
    gw.write_users({"alice": {"keys": [pubkey(keys["alice"])], "max_sessions": 2}})
    gw.start()
    assert gw.ssh("alice", "true").returncode == 0
    held = [subprocess.Popen([*gw.ssh_args("alice"), "sleep 30"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(2)]
    try:
        assert wait_for(lambda: sum(a == "sleep 30" for a in processes(
            docker_client, gw.container_name("alice"))) == 2, 30)
        r = gw.ssh("alice", "echo third", opts=("-o", "LogLevel=INFO"))
        assert r.returncode == 255 and b"too many open sessions" in r.stderr, r.stderr
        assert r.stdout == b""
    finally:
        for p in held:
            p.terminate()
            p.wait(10)
    assert wait_for(lambda: gw.ssh("alice", "true").returncode == 0, 15)


def test_idle_culling_keeps_data_and_respects_activity(
        make_gateway, keys: dict[str, Path], docker_client: docker.DockerClient) -> None:
    gw = make_gateway(idle_timeout="3s")
    gw.write_users({"alice": {"keys": [pubkey(keys["alice"])]}})
    gw.start()
    name = gw.container_name("alice")
    r = gw.ssh("alice", f"echo precious > keep.txt && {SLEEPER}")
    assert r.returncode == 0, r.stderr
    # an open session keeps it alive well past the timeout
    r = gw.ssh("alice", "sleep 8; echo alive")
    assert r.stdout == b"alive\n"
    assert container_status(docker_client, name) == "running"
    # a running inner container keeps it alive under the default policy
    assert gw.ssh("alice", "docker run -d --name nap sleeper /usr/bin/sleep 600").returncode == 0
    # the culler sees it idle past its timeout, and keeps it
    assert wait_for(lambda: "inner containers are running: kept" in gw.tail(200), 30)
    assert container_status(docker_client, name) == "running"
    # nothing left: culled within a few seconds
    assert gw.ssh("alice", "docker rm -f nap").returncode == 0
    assert wait_for(lambda: container_status(docker_client, name) == "exited", 30), gw.tail()
    assert "culling alice's environment" in gw.tail(200)
    # next login brings it back with home and image cache intact
    r = gw.ssh("alice", "cat keep.txt; docker images -q sleeper | wc -l")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"precious\n1\n"
    assert b"Starting your Docker environment" in r.stderr


def test_strict_policy_ignores_inner_containers(make_gateway, keys: dict[str, Path],
                                                docker_client: docker.DockerClient) -> None:
    gw = make_gateway(idle_timeout="2s", idle_policy="strict")
    gw.write_users({"bob": {"keys": [pubkey(keys["bob"])]}})
    gw.start()
    r = gw.ssh("bob", f"{SLEEPER} && docker run -d sleeper /usr/bin/sleep 600")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: container_status(docker_client, gw.container_name("bob"))
                    == "exited", 30)


def test_sigkill_then_restart_adopts_container(make_gateway, keys: dict[str, Path],
                                               docker_client: docker.DockerClient) -> None:
    gw = make_gateway()
    gw.start()
    r = gw.ssh("alice", "echo before-kill > f.txt")
    assert r.returncode == 0, r.stderr
    cid = docker_client.containers.get(gw.container_name("alice")).id
    held = subprocess.Popen([*gw.ssh_args("alice"), "sleep 60"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: "sleep 60" in processes(docker_client, gw.container_name("alice")),
                    30)
    gw.stop(sig=9)
    held.wait(30)
    gw.start()
    r = gw.ssh("alice", "cat f.txt")
    assert r.returncode == 0 and r.stdout == b"before-kill\n", r.stderr
    assert b"Starting" not in r.stderr  # reattached, not restarted
    owned = docker_client.containers.list(all=True, filters={
        "label": [f"dind-gateway.instance={gw.prefix}", "dind-gateway.owner=alice"]})
    assert [c.id for c in owned] == [cid]
    assert "adopted running environment of alice" in gw.tail(100)


def test_sigterm_notifies_sessions_and_keeps_containers(
        make_gateway, docker_client: docker.DockerClient) -> None:
    gw = make_gateway()
    gw.start()
    assert gw.ssh("bob", "true").returncode == 0
    held = subprocess.Popen([*gw.ssh_args("bob"), "sleep 60"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: "sleep 60" in processes(docker_client, gw.container_name("bob")),
                    30)
    gw.stop(sig=15)
    assert gw.proc is not None and gw.proc.returncode == 0
    _, err = held.communicate(timeout=30)
    assert b"dind-gateway is restarting; your container keeps running" in err, err
    assert container_status(docker_client, gw.container_name("bob")) == "running"
    with contextlib.suppress(Exception):
        held.kill()


def test_loopback_forward_is_her_own_loopback(gateway: GatewayProc,
                                              docker_client: docker.DockerClient) -> None:
    """-L localhost:P reaches 127.0.0.1:P inside *her* container: not the host's loopback, not
    bob's; her container's own address is accepted like its names."""
    import http.server

    port = free_port()
    host_server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=host_server.serve_forever, daemon=True).start()
    bob = subprocess.Popen(
        gateway.ssh_args("bob") + [f"mkdir -p w && echo bob-secret > w/index.html && exec "
                                   f"python3 -u -m http.server --bind 127.0.0.1 -d w {port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: b"Serving" in (bob.stdout.readline() or b"Serving"), 30)
        assert bob.poll() is None
        err = forward_attempt(gateway, "alice", f"localhost:{port}")
        assert b"open failed" in err and b"Connection refused" in err, err
        assert gateway.ssh("alice", "true").returncode == 0
        c = docker_client.containers.get(gateway.container_name("alice"))
        ip = next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]
        srv = subprocess.Popen(
            gateway.ssh_args("alice") + [f"mkdir -p w && echo alice-page > w/index.html && "
                                         f"exec python3 -u -m http.server -d w {port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: b"Serving" in (srv.stdout.readline() or b"Serving"), 30)
            local = free_port()
            tunnel = subprocess.Popen(gateway.ssh_args("alice", None, "-N", "-L",
                                                       f"127.0.0.1:{local}:{ip}:{port}"),
                                      stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                def page() -> bytes:
                    return subprocess.run(["curl", "-s", "--max-time", "3",
                                           f"http://127.0.0.1:{local}/"],
                                          capture_output=True).stdout
                assert wait_for(lambda: page() == b"alice-page\n", 30), page()
            finally:
                tunnel.terminate()
                tunnel.wait(10)
        finally:
            srv.kill()
            srv.wait(10)
    finally:
        bob.kill()
        bob.wait(10)
        host_server.shutdown()


def _through_unix_forward(gw: GatewayProc, user: str, path: str, url: str,
                          workdir: Path) -> tuple[bytes, bytes]:
    """curl's answer through `ssh -L local.sock:path`, and ssh's stderr."""
    local = workdir / f"fwd-{secrets.token_hex(4)}.sock"
    tunnel = subprocess.Popen(gw.ssh_args(user, None, "-o", "LogLevel=INFO", "-N", "-L",
                                          f"{local}:{path}"),
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = bytearray()
    reader = threading.Thread(target=_collect, args=(tunnel.stderr, err), daemon=True)
    reader.start()
    try:
        wait_for(local.exists, 20)
        out = subprocess.run(["curl", "-s", "--max-time", "5", "--unix-socket", str(local), url],
                             capture_output=True).stdout
        if not out:
            wait_for(lambda: b"open failed" in err, 10)
    finally:
        tunnel.terminate()
        tunnel.wait(10)
        reader.join(10)
    return out, bytes(err)


def test_unix_forward_stays_in_her_container(gateway: GatewayProc, tmp_path: Path) -> None:
    """A socket forward reaches sockets of hers only: her links to the host's paths resolve
    inside her container (her own rootless daemon answers, never the host engine), and
    nothing of bob's or root's is reachable."""
    assert gateway.ssh("alice", "ln -sf /run/docker.sock ~/evil.sock && "
                       "ln -sfn / ~/rootlink").returncode == 0
    for path in ("/home/alice/evil.sock", "/home/alice/rootlink/run/docker.sock",
                 "/proc/1/root/run/docker.sock", "/../../../run/docker.sock"):
        out, err = _through_unix_forward(gateway, "alice", path, "http://d/info", tmp_path)
        assert b"rootless" in out, (path, out[:300], err)  # her own daemon, not the host's
    r = gateway.ssh("bob", "python3 -c \"import socket,os; s=socket.socket(socket.AF_UNIX); "
                    "p=os.path.expanduser('~/bob.sock'); os.path.exists(p) and os.unlink(p); "
                    "s.bind(p); s.listen(1)\" ; true")
    assert r.returncode == 0
    out, err = _through_unix_forward(gateway, "alice", "/home/bob/bob.sock", "http://d/",
                                     tmp_path)
    assert out == b"" and b"open failed" in err, err
    # nothing there: refused with ssh's usual message, the gateway keeps serving
    out, err = _through_unix_forward(gateway, "alice", "/run/dgw-no-such/agent.sock",
                                     "http://d/", tmp_path)
    assert out == b"" and b"open failed" in err, err


def test_container_removed_mid_session(gateway: GatewayProc,
                                       docker_client: docker.DockerClient) -> None:
    """Her container removed under an open session (an admin's `docker rm -f`, a host
    clean-up): the session ends with the reason, the gateway keeps serving, and her next
    login makes a new container with her home intact."""
    assert gateway.ssh("erin", "echo kept > ~/kept.txt").returncode == 0
    session = subprocess.Popen(gateway.ssh_args("erin") + ["echo up; exec sleep 600"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert session.stdout.readline() == b"up\n"
        old = docker_client.containers.get(gateway.container_name("erin"))
        old.remove(force=True)
        out, err = session.communicate(timeout=60)
    finally:
        session.kill()
    assert session.returncode != 0 and b"your container was stopped or removed" in err, err
    assert b"log in again" in err and b"docker" not in err.lower(), err
    r = gateway.ssh("erin", "cat ~/kept.txt")
    assert r.returncode == 0 and r.stdout == b"kept\n", r.stderr
    assert docker_client.containers.get(gateway.container_name("erin")).id != old.id


def test_sessions_left_by_a_killed_gateway_are_ended(make_gateway, keys: dict[str, Path]
                                                     ) -> None:
    """After a SIGKILL of the gateway its sessions' clients are gone: the restarted gateway
    hangs up what they left running in the container (a pty shell's job, a command), kills the
    rest after the grace, and leaves what she detached alone. PID files do not pile up."""
    import random
    import signal

    import pexpect

    gw = make_gateway()
    gw.write_users({"alice": {"keys": [pubkey(keys["alice"])], "pids": 1000}})
    gw.start()
    for _ in range(15):
        assert gw.ssh("alice", "true").returncode == 0
    r = gw.ssh("alice", "ls /run/dgw-sessions | wc -l")
    assert int(r.stdout) <= 2, r.stdout  # ended sessions' files are cleaned up
    n = random.randrange(10_000, 90_000) * 10

    def alive(k: int) -> bool:
        return gw.ssh("alice", f"pgrep -f 'slee[p] {k}$' >/dev/null").returncode == 0

    shell = pexpect.spawn(" ".join(gw.ssh_args("alice", None, "-tt")), timeout=60)
    command = subprocess.Popen(gw.ssh_args("alice") + [f"sleep {n + 1}"],
                               stdin=subprocess.PIPE)
    try:
        shell.sendline(f"setsid sleep {n + 2} </dev/null >/dev/null 2>&1 & sleep {n}")
        assert wait_for(lambda: all(alive(n + i) for i in range(3)), 60)
        gw.stop(signal.SIGKILL)
        gw.start()
        assert wait_for(lambda: not alive(n) and not alive(n + 1), 60), gw.tail()
        assert alive(n + 2)  # detached: hers to keep
        assert "left by the previous gateway process" in gw.tail(200)
    finally:
        shell.close(force=True)
        command.kill()
        command.wait(10)
        gw.ssh("alice", f"pkill -f 'slee[p] {n + 2}$'; true")
