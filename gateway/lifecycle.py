"""Who is using which environment, and stopping the ones nobody uses (idle culling).

Activity is counted per user as open authenticated SSH connections (an `ssh -N -L` tunnel
keeps its container alive as much as a shell does).  When the last one closes the idle clock
starts; a culler stops containers idle for longer than their `idle_timeout`.  Under the default
`activity` policy a container whose inner daemon still runs containers counts as busy, so a long
build or a `docker run -d` service is never killed; `strict` ignores inner containers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from .dockerapi import DockerError

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("dind_gateway.lifecycle")


class Activity:
    """Open connections and sessions per user, and when each user was last active."""

    def __init__(self) -> None:
        self.connections: dict[str, int] = defaultdict(int)
        self.sessions: dict[str, int] = defaultdict(int)
        self.last_active: dict[str, float] = {}

    def touch(self, user: str) -> None:
        self.last_active[user] = time.monotonic()

    def connection_opened(self, user: str) -> None:
        self.connections[user] += 1
        self.touch(user)

    def connection_closed(self, user: str) -> None:
        self.connections[user] = max(0, self.connections[user] - 1)
        self.touch(user)

    def session_opened(self, user: str) -> None:
        self.sessions[user] += 1
        self.touch(user)

    def session_closed(self, user: str) -> None:
        self.sessions[user] = max(0, self.sessions[user] - 1)
        self.touch(user)

    def busy(self, user: str) -> bool:
        return self.connections.get(user, 0) > 0

    def idle_for(self, user: str) -> float:
        """Seconds since the user was last active (since adoption if never seen)."""
        return time.monotonic() - self.last_active.setdefault(user, time.monotonic())


class IdleCuller:
    """Periodically stops environments that have been idle longer than their timeout."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._task: asyncio.Task[None] | None = None

    def interval(self) -> float:
        timeouts = [t for t in self._timeouts().values() if t is not None]
        if not timeouts:
            return 30.0
        return max(0.5, min(30.0, min(timeouts) / 4))

    def _timeouts(self) -> dict[str, float | None]:
        cfg = self.gateway.config
        return {name: user.effective_idle_timeout(cfg)
                for name, user in self.gateway.users.users.items()}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval())
            try:
                await self.sweep()
            except DockerError as exc:
                log.warning("idle sweep failed: %s", exc)
            except Exception:  # noqa: BLE001 - the culler must outlive one bad sweep
                log.exception("idle sweep failed")

    async def sweep(self) -> list[str]:
        """One pass: stop what is idle; return the users whose containers were stopped."""
        gw = self.gateway
        timeouts = self._timeouts()
        culled = []
        for state in await gw.backend.list_environments():
            if not state.running:
                continue
            timeout = timeouts.get(state.user, gw.config.idle_timeout)
            if timeout is None or gw.activity.busy(state.user):
                continue
            idle = gw.activity.idle_for(state.user)
            if idle < timeout:
                continue
            if gw.config.idle_policy == "activity" and await gw.backend.has_workloads(
                    state.user):
                gw.activity.touch(state.user)
                log.info("%s idle %.0f s but inner containers are running: kept", state.user,
                         idle)
                continue
            async with gw.user_lock(state.user):
                if gw.activity.busy(state.user):  # someone logged in meanwhile
                    continue
                log.info("culling %s's environment after %.0f s idle", state.user, idle)
                await gw.backend.stop(state.user)
            gw.events.emit("container.cull", user=state.user, idle=round(idle, 1),
                           timeout=timeout)
            culled.append(state.user)
        return culled
