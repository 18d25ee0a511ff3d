"""Adoption at start takes environments in hand several at a time (a narrow unit test: a
stand-in for the backend that records what adoption asks of it)."""

from __future__ import annotations

import asyncio

import asyncssh
import yaml

from gateway.backend import EnvState
from gateway.config import parse_users
from gateway.services.adopter import ADOPT_AT_ONCE, Adopter
from gateway.services.registry import Activity

KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


class Platform:
    """list_environments / stop / reap only: what Adopter uses.  Each stop and reap waits
    until `together` of them are under way at once, so done one at a time they never end."""

    def __init__(self, states: list[EnvState], together: int) -> None:
        self.states = states
        self.stopped: list[str] = []
        self.reaped: list[str] = []
        self.peak = 0
        self._now = 0
        self._all_in = asyncio.Event()
        self._together = together

    async def list_environments(self) -> list[EnvState]:
        return self.states

    async def _call(self, done: list[str], user: str) -> None:
        self._now += 1
        self.peak = max(self.peak, self._now)
        if self._now >= self._together:
            self._all_in.set()
        await self._all_in.wait()
        self._now -= 1
        done.append(user)

    async def stop(self, user: str) -> None:
        await self._call(self.stopped, user)

    async def reap(self, user: str) -> None:
        await self._call(self.reaped, user)


def state(user: str, running: bool = True) -> EnvState:
    return EnvState(user=user, exists=True, running=running, container_id="c0ffee" + user)


async def test_departed_users_are_stopped_together_not_one_by_one() -> None:
    allowed = parse_users(yaml.safe_dump({"users": {
        "alice": {"keys": [KEY]}, "bob": {"keys": [KEY], "disabled": True}}}))
    gone = [f"user{i}" for i in range(5)]
    states = [state("alice"), state("bob"), state("carol", running=False),
              *(state(u) for u in gone)]
    # alice's reap and the six stops (bob is disabled, user0..4 are gone; carol is stopped)
    platform = Platform(states, together=7)
    activity = Activity()
    adopter = Adopter(platform, lambda: allowed, activity)  # type: ignore[arg-type]
    await asyncio.wait_for(adopter.start(), 10)
    assert adopter.done
    assert sorted(platform.stopped) == sorted(["bob", *gone])
    assert platform.reaped == ["alice"]
    assert "alice" in activity.last_active and "bob" not in activity.last_active
    assert platform.peak == 7 <= ADOPT_AT_ONCE


async def test_no_more_than_the_bound_at_once() -> None:
    gone = [f"user{i}" for i in range(ADOPT_AT_ONCE * 2)]
    platform = Platform([state(u) for u in gone], together=ADOPT_AT_ONCE)
    adopter = Adopter(platform, lambda: parse_users("users: {}\n"),  # type: ignore[arg-type]
                      Activity())
    await asyncio.wait_for(adopter.start(), 10)
    assert sorted(platform.stopped) == sorted(gone)
    assert platform.peak == ADOPT_AT_ONCE
