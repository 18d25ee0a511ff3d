"""The reloader's diff is pure: old users + new users + live connections → a plan."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncssh
import yaml

from gateway.auth import AuthorizedKey
from gateway.backend import Limits
from gateway.config import User, parse_users
from gateway.services.reloader import diff

KEYS = [asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
        for _ in range(3)]


def users(doc: dict) -> object:
    return parse_users(yaml.safe_dump({"users": doc}))


@dataclass(eq=False)
class Conn:
    user: User
    key: AuthorizedKey | None
    authenticated: bool = True
    notices: list[str] = field(default_factory=list)

    def notify_and_close(self, message: str) -> None:
        self.notices.append(message)


def test_diff_names_every_change_and_touches_nothing() -> None:
    old = users({"alice": {"keys": [KEYS[0], KEYS[1]], "cpus": 1},
                 "bob": {"keys": [KEYS[2]]}, "carol": {"keys": [KEYS[2]]},
                 "dave": {"keys": [KEYS[2]], "shell": "/bin/bash"}})
    new = users({"alice": {"keys": [KEYS[1]], "cpus": 2},
                 "carol": {"keys": [KEYS[2]], "disabled": True},
                 "dave": {"keys": [KEYS[2]], "shell": "/bin/zsh"},
                 "erin": {"keys": [KEYS[0]]}})
    a0 = Conn(old.user("alice"), old.user("alice").keys[0])
    a1 = Conn(old.user("alice"), old.user("alice").keys[1])
    b = Conn(old.user("bob"), None)
    pending = Conn(old.user("dave"), None, authenticated=False)
    plan = diff(old, new, [a0, a1, b, pending])
    assert sorted(plan.stop) == ["bob", "carol"]
    assert {c: m for c, m in plan.close} == {
        a0: "the key you logged in with was revoked by an admin.",
        b: "your access was removed by an admin."}
    assert [(c, u.name, k.fingerprint) for c, u, k in plan.rebind] == [
        (a1, "alice", new.user("alice").keys[0].fingerprint)]
    assert plan.limits == {"alice": Limits(cpus=2.0)}
    assert "erin added" in plan.changes and "dave shell changed (new sessions)" in plan.changes
    assert a0.notices == [] and a1.user is old.user("alice")  # diff applied nothing


def test_unchanged_users_give_an_empty_plan() -> None:
    old = users({"alice": {"keys": [KEYS[0]]}})
    conn = Conn(old.user("alice"), old.user("alice").keys[0])
    plan = diff(old, users({"alice": {"keys": [KEYS[0]]}}), [conn])
    assert (plan.changes, plan.stop, plan.close, plan.limits) == ([], [], [], {})
    assert len(plan.rebind) == 1


def test_diff_says_when_image_and_group_changes_apply() -> None:
    def doc(members: list[str], image: str | None, vol: str = "300m") -> object:
        return parse_users(yaml.safe_dump({
            "groups": {"team": {"members": members, "image": "team/dind:1",
                                "volumes": {"s": {"path": "/srv/s", "size": vol}}}},
            "users": {"alice": {"keys": [KEYS[0]], **({"image": image} if image else {})},
                      "bob": {"keys": [KEYS[1]]}}}))

    plan = diff(doc(["alice"], None), doc(["bob"], "own/dind:2"), [])
    assert plan.limits == {}  # nothing to apply live
    when = "at her next container start, or `dind-gateway upgrade"
    assert f"alice image team/dind:1 -> own/dind:2 ({when} alice`)" in plan.changes
    assert f"alice leaves team ({when} alice`)" in plan.changes
    assert f"bob image default -> team/dind:1 ({when} bob`)" in plan.changes
    assert f"bob joins team ({when} bob`)" in plan.changes
    plan = diff(doc(["alice"], None), doc(["alice"], None, "1g"), [])
    assert plan.changes == [f"alice group volumes changed ({when} alice`)"]
