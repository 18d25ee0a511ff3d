"""Issue 4: admins edit users.yaml live; reload, revoke, re-limit, password login, admin CLI."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from gateway.auth import hash_password

from .conftest import ROOT, GatewayProc, container_status, pubkey, wait_for
from .unit.test_config import BAD_USERS


def cli(gw: GatewayProc, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(gw.config)]
                          if args[0] != "hash-password" else
                          [sys.executable, "-m", "gateway", *args],
                          capture_output=True, text=True, cwd=ROOT, input=input, timeout=120)


def held_session(gw: GatewayProc, user: str, key: str | None = None) -> subprocess.Popen:
    """A long-running session; the caller reads its stderr after it ends."""
    p = subprocess.Popen([*gw.ssh_args(user, key), "echo up; sleep 120"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"up\n"
    return p


def users(keys: dict[str, Path], **extra: dict) -> dict[str, dict]:
    base = {
        "alice": {"keys": [pubkey(keys["alice"]), pubkey(keys["alice2"])]},
        "bob": {"keys": [pubkey(keys["bob"])]},
        "carol": {"keys": [pubkey(keys["carol"])]},
        "dave": {"keys": [pubkey(keys["dave"])], "memory": "1g", "pids": 1000, "cpus": 1},
    }
    for name, settings in extra.items():
        base[name] = settings
    return base


@pytest.fixture(scope="module")
def live(tmp_path_factory, keys: dict[str, Path], docker_client: docker.DockerClient):
    from .conftest import remove_labelled
    gw = GatewayProc(tmp_path_factory.mktemp("live"), keys)
    gw.write_users(users(keys))
    gw.start()
    yield gw
    gw.stop()
    print(f"--- live gateway log ---\n{gw.tail(150)}")
    remove_labelled(docker_client, gw.prefix)


def test_new_user_and_key_work_at_once(live: GatewayProc, keys: dict[str, Path]) -> None:
    assert live.ssh("erin", "true").returncode == 255
    live.write_users(users(keys, erin={"keys": [pubkey(keys["erin"])]}))
    assert wait_for(lambda: live.ssh("erin", "true").returncode == 0, 10)
    assert "erin added" in live.tail(50)


def test_removed_key_closes_its_sessions_only(live: GatewayProc, keys: dict[str, Path]) -> None:
    via_second = held_session(live, "alice", key="alice2")
    via_first = held_session(live, "alice")
    try:
        cfg = users(keys)
        cfg["alice"]["keys"] = [pubkey(keys["alice"])]
        live.write_users(cfg)
        _, err = via_second.communicate(timeout=15)
        assert b"the key you logged in with was revoked by an admin" in err, err
        assert via_first.poll() is None  # the other key's session is untouched
        assert live.ssh("alice", "true", key="alice2").returncode == 255
        assert live.ssh("alice", "true").returncode == 0
    finally:
        via_first.kill()
        via_second.kill()


@pytest.mark.parametrize("how", ["removed", "disabled"])
def test_removed_or_disabled_user_is_cut_off(live: GatewayProc, keys: dict[str, Path],
                                             docker_client: docker.DockerClient,
                                             how: str) -> None:
    user = {"removed": "bob", "disabled": "carol"}[how]
    live.write_users(users(keys))
    assert wait_for(lambda: live.ssh(user, "echo hi > mark.txt").returncode == 0, 10)
    held = held_session(live, user)
    cfg = users(keys)
    if how == "removed":
        del cfg[user]
    else:
        cfg[user]["disabled"] = True
    live.write_users(cfg)
    _, err = held.communicate(timeout=15)
    assert b"your access was removed by an admin" in err, err
    assert wait_for(lambda: container_status(docker_client, live.container_name(user))
                    == "exited", 40)
    assert live.ssh(user, "true").returncode == 255
    vols = {v.name for v in docker_client.volumes.list(
        filters={"label": f"dind-gateway.owner={user}"})}
    assert f"{live.prefix}-{user}-home" in vols  # data kept
    # back in: the data is still there
    live.write_users(users(keys))
    assert wait_for(lambda: live.ssh(user, "cat mark.txt").stdout == b"hi\n", 30)


def test_limits_change_live(live: GatewayProc, keys: dict[str, Path],
                            docker_client: docker.DockerClient) -> None:
    live.write_users(users(keys))
    assert wait_for(lambda: live.ssh("dave", "true").returncode == 0, 10)
    cid = docker_client.containers.get(live.container_name("dave")).id
    read = ("cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max "
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
    assert live.ssh("dave", read).stdout.split() == [b"1073741824", b"1000", b"100000"]
    cfg = users(keys)
    cfg["dave"].update(memory="512m", pids=300, cpus=0.5)
    live.write_users(cfg)
    assert wait_for(lambda: live.ssh("dave", read).stdout.split() ==
                    [b"536870912", b"300", b"50000"], 15)
    assert docker_client.containers.get(live.container_name("dave")).id == cid  # no restart


BAD_LIVE = BAD_USERS[:32]


def test_malformed_edits_are_refused_and_old_config_stays(live: GatewayProc,
                                                          keys: dict[str, Path]) -> None:
    """Each bad edit is refused with file:line: field in the log; logins keep working."""
    live.write_users(users(keys))
    assert wait_for(lambda: live.ssh("alice", "true").returncode == 0, 10)
    for name, text, line, field, _fragment in BAD_LIVE:
        before = live.tail(100000).count("users file refused")
        live.users_file.write_text(text)
        assert wait_for(lambda b=before: live.tail(100000).count("users file refused") > b,
                        10), name
        last = [ln for ln in live.tail(100000).splitlines() if "users file refused" in ln][-1]
        where = f"{live.users_file}:{line}: " + (f"{field}: " if field else "")
        assert where in last, (name, last)
        r = live.ssh("alice", "echo still-in")
        assert r.stdout == b"still-in\n", (name, r.stderr)
    live.write_users(users(keys))  # fixing the file applies it
    assert wait_for(lambda: "users file reloaded" in live.tail(3), 10)


def test_check_catches_errors_offline(tmp_path: Path, keys: dict[str, Path]) -> None:
    gw = GatewayProc(tmp_path, keys)
    gw.config.write_text("users_file: users.yaml\nstate_dir: state\n")
    gw.write_users(users(keys))
    r = cli(gw, "check")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    for name, text, line, field, _ in BAD_USERS[::6]:
        gw.users_file.write_text(text)
        r = cli(gw, "check")
        assert r.returncode == 1, name
        assert f"{gw.users_file}:{line}: " + (f"{field}:" if field else "") in r.stderr, name
    gw.config.write_text("listen: 0.0.0.0:99999\n")
    r = cli(gw, "check")
    assert r.returncode == 1 and f"{gw.config}:1: listen:" in r.stderr, r.stderr


def test_password_login(make_gateway, keys: dict[str, Path], tmp_path: Path) -> None:
    gw = make_gateway()
    gw.write_users({"alice": {"password": hash_password("s3cret-a", "bcrypt")},
                    "bob": {"password": hash_password("s3cret-b", "sha512_crypt"),
                            "keys": [pubkey(keys["bob"])]}})
    gw.start()

    def login(user: str, password: str) -> subprocess.CompletedProcess:
        askpass = tmp_path / "askpass.sh"
        askpass.write_text(f"#!/bin/sh\necho '{password}'\n")
        askpass.chmod(askpass.stat().st_mode | stat.S_IEXEC)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
               "DISPLAY": ":0"}
        args = ["ssh", "-p", str(gw.port), "-o", "PubkeyAuthentication=no",
                "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", f"{user}@127.0.0.1", "echo $USER"]
        return subprocess.run(args, capture_output=True, env=env, timeout=120,
                              stdin=subprocess.DEVNULL, start_new_session=True)

    assert login("alice", "s3cret-a").stdout == b"alice\n"
    assert login("bob", "s3cret-b").stdout == b"bob\n"
    r = login("alice", "wrong")
    assert r.returncode == 255 and b"Permission denied" in r.stderr
    assert "method=password reason=wrong password" in gw.tail(100)
    # the hash-password command makes hashes the config accepts
    out = cli(gw, "hash-password", input="typed-secret\n")
    assert out.returncode == 0 and out.stdout.startswith("$2b$"), out.stderr


def test_no_password_auth_offered_without_passwords(make_gateway) -> None:
    gw = make_gateway()
    gw.start()
    r = subprocess.run(["ssh", "-v", "-p", str(gw.port), "-o", "BatchMode=yes",
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "PubkeyAuthentication=no", "nobody@127.0.0.1", "true"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert b"Authentications that can continue: publickey\n" in r.stderr.replace(b"\r", b"")


def test_ps_stop_restart_purge(make_gateway, keys: dict[str, Path],
                               docker_client: docker.DockerClient) -> None:
    gw = make_gateway()
    gw.write_users(users(keys))
    gw.start()
    assert gw.ssh("alice", "true").returncode == 0
    assert gw.ssh("bob", "true").returncode == 0
    r = cli(gw, "stop", "bob")
    assert r.returncode == 0, r.stderr
    held = held_session(gw, "alice")
    try:
        r = cli(gw, "ps")
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
        assert rows["alice"][1] == "running" and rows["alice"][3] == "1"
        assert rows["alice"][6] != "-" and "/" in r.stdout  # pids and memory used / limit
        assert rows["bob"][1] == "exited" and rows["bob"][3] == "0"
        assert rows["carol"][1] == "absent"
        assert container_status(docker_client, gw.container_name("bob")) == "exited"
    finally:
        held.kill()
    r = cli(gw, "restart", "bob")
    assert r.returncode == 0 and container_status(
        docker_client, gw.container_name("bob")) == "running"
    r = cli(gw, "purge", "bob")
    assert r.returncode == 1 and "--yes" in r.stderr
    r = cli(gw, "purge", "bob", "--yes")
    assert r.returncode == 0, r.stderr
    assert container_status(docker_client, gw.container_name("bob")) == "missing"
    assert not docker_client.volumes.list(filters={"label": "dind-gateway.owner=bob",
                                                   "name": gw.prefix})
    r = cli(gw, "stop", "nosuchuser")
    assert r.returncode == 1 and "no such user" in r.stderr
    sock = gw.dir / "state" / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_sighup_reloads(make_gateway, keys: dict[str, Path]) -> None:
    gw = make_gateway()
    gw.write_users({"alice": {"keys": [pubkey(keys["alice"])]}})
    gw.start()
    assert gw.proc is not None
    gw.proc.send_signal(1)
    assert wait_for(lambda: "users file checked (SIGHUP): unchanged" in gw.tail(20), 5)
    assert gw.proc.poll() is None
    r = cli(gw, "reload")
    assert r.returncode == 0 and "unchanged" in r.stdout, r.stderr
    gw.users_file.write_text("users: [\n")
    r = cli(gw, "reload")
    assert r.returncode == 1 and f"{gw.users_file}:" in r.stderr, r.stderr
