"""Issue 16 (part): groups with shared volumes, images per user or group, image roll-out.

Real gateway subprocess, real OpenSSH client, real engine.  Test images are built here from
the test image with an extra LABEL and a marker file, tagged with this run's own prefix, and
removed at the end; nothing is pulled.
"""

from __future__ import annotations

import io
import secrets
import subprocess
from pathlib import Path

import docker
import pytest
import yaml

from .conftest import IMAGE, GatewayProc, pubkey, remove_labelled, unmount_under, wait_for
from .test_admin import cli, held_session

TAG = f"dgwteams{secrets.token_hex(3)}/dind"


def build(client: docker.DockerClient, tag: str, flavour: str) -> str:
    """A tiny image on top of the test image: a LABEL and /etc/dgw-flavour; its id."""
    dockerfile = (f"FROM {IMAGE}\nLABEL dgw-test.flavour={flavour}\n"
                  f"RUN echo {flavour} > /etc/dgw-flavour\n")
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True,
                                   pull=False)
    return image.id


@pytest.fixture(scope="module")
def images(docker_client: docker.DockerClient):
    made: list[str] = []

    def make(name: str, flavour: str) -> str:
        image_id = build(docker_client, f"{TAG}:{name}", flavour)
        made.append(image_id)
        return f"{TAG}:{name}"

    yield make
    for image_id in reversed(made):  # containers are gone by now (their gateways' teardown)
        try:
            docker_client.images.remove(image_id, force=True)
        except docker.errors.APIError as exc:
            print(f"image {image_id} not removed: {exc}")


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout.decode() if isinstance(r.stdout, bytes) else r.stdout


def write_doc(gw: GatewayProc, doc: dict) -> None:
    tmp = gw.users_file.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(gw.users_file)


def team_doc(keys: dict[str, Path], team_image: str, bob_image: str,
             members: tuple[str, ...] = ("alice", "bob")) -> dict:
    return {
        "defaults": {"memory": "1g", "pids": 1000, "cpus": 1},
        "groups": {"team": {
            "members": list(members), "image": team_image, "pids": 1500,
            "volumes": {"share": {"path": "/srv/share", "size": "300m"},
                        "docs": {"path": "/srv/docs", "size": "300m", "read_only": True}}}},
        "users": {
            "alice": {"keys": [pubkey(keys["alice"])]},
            "bob": {"keys": [pubkey(keys["bob"])], "image": bob_image},
            "carol": {"keys": [pubkey(keys["carol"])]},
        },
    }


@pytest.fixture(scope="module")
def team(tmp_path_factory, keys: dict[str, Path], docker_client: docker.DockerClient, images):
    gw = GatewayProc(tmp_path_factory.mktemp("team"), keys)
    team_image, bob_image = images("team", "team"), images("bob", "bob")
    write_doc(gw, team_doc(keys, team_image, bob_image))
    gw.start()
    gw.images = (team_image, bob_image)  # type: ignore[attr-defined]
    yield gw
    gw.stop()
    print(f"--- team gateway log ---\n{gw.tail(150)}")
    remove_labelled(docker_client, gw.prefix)
    unmount_under(gw.dir)


def test_members_share_a_volume_and_nobody_else_has_it(team: GatewayProc) -> None:
    ok(team.ssh("alice", "echo from-alice > /srv/share/a && mkdir /srv/share/dir"))
    # bob has his own uid, yet reads and extends alice's file and writes in her directory
    assert ok(team.ssh("bob", "cat /srv/share/a")) == "from-alice\n"
    ok(team.ssh("bob", "echo from-bob >> /srv/share/a && echo b > /srv/share/dir/b"))
    assert ok(team.ssh("alice", "cat /srv/share/a /srv/share/dir/b")) == "from-alice\nfrom-bob\nb\n"
    ok(team.ssh("alice", "rm /srv/share/dir/b"))
    uids = ok(team.ssh("alice", "stat -c %u /srv/share/a; id -u")).split()
    assert uids[0] == uids[1] and ok(team.ssh("bob", "id -u")).strip() != uids[0]
    # the quota: a disk of its own, 300 MiB
    size = int(ok(team.ssh("bob", "df -B1 --output=size /srv/share")).split()[-1])
    assert 200 << 20 < size <= 300 << 20
    # carol is not a member: nothing is mounted there, nothing of theirs reachable
    r = team.ssh("carol", "ls /srv/share")
    assert r.returncode != 0 and b"No such file" in r.stderr
    assert "/srv/" not in ok(team.ssh("carol", "cat /proc/self/mounts"))


def test_read_only_volume(team: GatewayProc) -> None:
    host = team.dir / "state" / "disks" / f"{team.prefix}.team.docs" / "data"
    ok(team.ssh("alice", "true"))  # her start mounted it
    (host / "readme").write_text("from the admin\n")
    assert ok(team.ssh("alice", "cat /srv/docs/readme")) == "from the admin\n"
    r = team.ssh("bob", "echo x > /srv/docs/mine")
    assert r.returncode != 0 and b"Read-only file system" in r.stderr, r.stderr


def test_group_image_for_members_only_and_user_override_wins(
        team: GatewayProc, docker_client: docker.DockerClient) -> None:
    team_image, bob_image = team.images  # type: ignore[attr-defined]
    flavours = {u: ok(team.ssh(u, "cat /etc/dgw-flavour 2>/dev/null || echo plain")).strip()
                for u in ("alice", "bob", "carol")}
    assert flavours == {"alice": "team", "bob": "bob", "carol": "plain"}
    got = {u: docker_client.containers.get(team.container_name(u)).attrs["Config"]["Image"]
           for u in ("alice", "bob", "carol")}
    assert got == {"alice": team_image, "bob": bob_image, "carol": IMAGE}
    # the group's pids over defaults' for members; carol keeps the defaults
    pids = {u: docker_client.containers.get(team.container_name(u)).attrs["HostConfig"][
        "PidsLimit"] for u in ("alice", "carol")}
    assert pids == {"alice": 1500, "carol": 1000}


def test_bad_group_definitions_are_refused_with_file_line(
        team: GatewayProc, keys: dict[str, Path]) -> None:
    team_image, bob_image = team.images  # type: ignore[attr-defined]
    good = team.users_file.read_text()
    try:
        write_doc(team, team_doc(keys, team_image, bob_image, ("alice", "bob", "bbo")))
        r = cli(team, "reload")
        assert r.returncode == 1
        line = next(i for i, t in enumerate(team.users_file.read_text().splitlines(), 1)
                    if "bbo" in t)
        assert (f"{team.users_file}:{line}: groups.team.members[2]: no user 'bbo' in users: "
                "(did you mean 'bob'?)") in r.stderr, r.stderr
        missing = f"{TAG}:nosuchimage"
        write_doc(team, team_doc(keys, missing, bob_image))
        r = cli(team, "reload")
        assert r.returncode == 1
        line = next(i for i, t in enumerate(team.users_file.read_text().splitlines(), 1)
                    if "nosuchimage" in t)
        assert (f"{team.users_file}:{line}: groups.team.image: image '{missing}' is not on "
                "the Docker engine") in r.stderr, r.stderr
        # the last good file is in force: alice still gets the team image
        assert ok(team.ssh("alice", "cat /etc/dgw-flavour")).strip() == "team"
    finally:
        team.users_file.write_text(good)
        assert wait_for(lambda: cli(team, "reload").returncode == 0, 10)


def test_membership_change_applies_at_next_start(team: GatewayProc,
                                                 keys: dict[str, Path]) -> None:
    team_image, bob_image = team.images  # type: ignore[attr-defined]
    good = team.users_file.read_text()
    ok(team.ssh("bob", "test -d /srv/share"))
    try:
        write_doc(team, team_doc(keys, team_image, bob_image, ("alice",)))
        r = cli(team, "reload")  # (or the file watcher was first: then it says unchanged)
        assert r.returncode == 0, r.stderr
        assert wait_for(lambda: "bob leaves team (at her next container start, or "
                        "`dind-gateway upgrade bob`)" in team.tail(80), 5), team.tail(20)
        ok(team.ssh("bob", "test -d /srv/share"))  # running: unchanged until it starts again
        ok(cli(team, "restart", "bob"))
        r = team.ssh("bob", "test -e /srv/share")
        assert r.returncode == 1
        assert "group volumes changed): made again at this start" in team.tail(80)
        assert ok(team.ssh("alice", "cat /srv/share/a")) == "from-alice\nfrom-bob\n"
    finally:
        team.users_file.write_text(good)
        assert wait_for(lambda: cli(team, "reload").returncode == 0, 10)


# --------------------------------------------------------------------------------------------
# Roll-out


def ps_rows(gw: GatewayProc) -> dict[str, list[str]]:
    out = ok(cli(gw, "ps"))
    lines = out.splitlines()
    return {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(" ")}


def image_column(gw: GatewayProc) -> dict[str, str]:
    out = ok(cli(gw, "ps")).splitlines()
    start = out[0].index("IMAGE")
    return {line.split()[0]: line[start:].strip() for line in out[1:]
            if not line.startswith(" ")}


def test_upgrade_when_idle_keeps_home_and_image_cache(
        make_gateway, keys: dict[str, Path], docker_client: docker.DockerClient,
        images) -> None:
    roll = images("roll", "v1")
    gw = make_gateway()
    write_doc(gw, {"defaults": {"memory": "1g", "pids": 1000, "cpus": 1, "image": roll},
                   "users": {u: {"keys": [pubkey(keys[u])]} for u in ("alice", "bob")}})
    gw.start()
    for user in ("alice", "bob"):
        ok(gw.ssh(user, f"echo {user}-home > ~/keep && printf 'FROM scratch\\nCOPY keep /keep\\n'"
                  " > Dockerfile && docker build -q -t mine:1 . >/dev/null"))
        assert ok(gw.ssh(user, "cat /etc/dgw-flavour")).strip() == "v1"
    before = {u: docker_client.containers.get(gw.container_name(u)).id for u in ("alice", "bob")}
    assert image_column(gw) == {"alice": "current", "bob": "current"}

    images("roll", "v2")  # the tag moves to a new build
    assert image_column(gw) == {"alice": "outdated", "bob": "outdated"}
    assert "was rebuilt" in ok(cli(gw, "ps"))

    held = held_session(gw, "alice")
    try:
        out = ok(cli(gw, "upgrade", "--all", "--when-idle"))
        assert "alice: outdated" in out and "upgraded when she goes idle" in out, out
        assert "bob: upgraded" in out, out
        # bob (idle) at once; alice's session is untouched
        assert docker_client.containers.get(gw.container_name("bob")).id != before["bob"]
        assert docker_client.containers.get(gw.container_name("alice")).id == before["alice"]
        assert held.poll() is None
        assert image_column(gw) == {"alice": "outdated, upgrade when idle", "bob": "current"}
    finally:
        held.kill()
        held.wait()

    def alice_upgraded() -> bool:
        try:
            c = docker_client.containers.get(gw.container_name("alice"))
        except docker.errors.NotFound:
            return False
        return c.id != before["alice"] and c.status == "running"

    assert wait_for(alice_upgraded, 120), gw.tail(40)
    for user in ("alice", "bob"):
        assert ok(gw.ssh(user, "cat /etc/dgw-flavour")).strip() == "v2"
        assert ok(gw.ssh(user, "cat ~/keep")) == f"{user}-home\n"
        assert ok(gw.ssh(user, "docker image inspect -f '{{.Id}}' mine:1")).startswith("sha256:")
        net = docker_client.containers.get(gw.container_name(user)).attrs[
            "NetworkSettings"]["Networks"]
        assert list(net) == [gw.container_name(user)]
    assert wait_for(lambda: image_column(gw) == {"alice": "current", "bob": "current"}, 10)

    # never while she has sessions unless --now, and then her sessions are told first
    images("roll", "v3")
    held = held_session(gw, "bob")
    try:
        out = ok(cli(gw, "upgrade", "bob"))
        assert "connected; not upgraded" in out, out
        assert held.poll() is None
        out = ok(cli(gw, "upgrade", "bob", "--now"))
        assert "bob: upgraded" in out, out
        _, err = held.communicate(timeout=30)
        assert b"an admin is upgrading your environment" in err, err
    finally:
        held.kill()
    assert ok(gw.ssh("bob", "cat /etc/dgw-flavour")).strip() == "v3"
    assert ok(gw.ssh("bob", "cat ~/keep")) == "bob-home\n"
