"""Stopping the environments nobody uses (idle culling).

When a user's last connection closes her idle clock starts (services.registry); the culler
stops environments idle for longer than their `idle_timeout`.  Under the default `activity`
policy an environment that is busy on its own (inner containers running) counts as busy, so a
long build or a `docker run -d` service is never killed; `strict` ignores inner containers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..backend import Backend, BackendError
from ..config import GatewayConfig, UsersConfig
from ..observe.events import Events
from .registry import Activity

log = logging.getLogger("dind_gateway.lifecycle")


class IdleCuller:
    """Periodically stops environments that have been idle longer than their timeout."""

    def __init__(self, backend: Backend, activity: Activity, users: Callable[[], UsersConfig],
                 config: GatewayConfig, events: Events) -> None:
        self.backend = backend
        self.activity = activity
        self.users = users
        self.config = config
        self.events = events
        self._task: asyncio.Task[None] | None = None

    def interval(self) -> float:
        timeouts = [t for t in self._timeouts().values() if t is not None]
        if not timeouts:
            return 30.0
        return max(0.5, min(30.0, min(timeouts) / 4))

    def _timeouts(self) -> dict[str, float | None]:
        return {name: user.effective_idle_timeout(self.config)
                for name, user in self.users().users.items()}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        failing = False  # a platform outage is one warning, not one per sweep
        while True:
            await asyncio.sleep(self.interval())
            try:
                await self.sweep()
            except BackendError as exc:
                if not failing:
                    log.warning("idle sweep failed: %s (said once until a sweep works)", exc)
                else:
                    log.debug("idle sweep failed again: %s", exc)
                failing = True
                continue
            except Exception:  # noqa: BLE001 - the culler must outlive one bad sweep
                log.exception("idle sweep failed")
                continue
            if failing:
                log.info("idle sweeps work again")
                failing = False

    async def sweep(self) -> list[str]:
        """One pass: stop what is idle; return the users whose environments were stopped."""
        timeouts = self._timeouts()
        culled = []
        for state in await self.backend.list_environments():
            if not state.running:
                continue
            user = state.user
            timeout = timeouts.get(user, self.config.idle_timeout)
            if timeout is None or self.activity.busy(user):
                continue
            idle = self.activity.idle_for(user)
            if idle < timeout:
                continue
            if self.config.idle_policy == "activity" and await self.backend.has_workloads(user):
                self.activity.touch(user)
                log.info("%s idle %.0f s but inner containers are running: kept", user, idle)
                continue
            log.info("culling %s's environment after %.0f s idle", user, idle)
            # checked again under the user's lock: someone may have logged in meanwhile
            if not await self.backend.stop(user, unless=lambda u=user: self.activity.busy(u)):
                continue
            self.events.emit("container.cull", user=user, idle=round(idle, 1),
                             timeout=timeout)
            culled.append(user)
        return culled
