"""Image roll-out: `dind-gateway upgrade USER|--all [--when-idle] [--now]`.

An environment is *outdated* when the backend says it is not what the users file would make
now (its image tag moved to a new build, its image setting or its group volumes changed).
Upgrading makes it again from the current settings, keeping the user's data and network
(`Backend.upgrade`).  Never while she is connected, unless the admin says `--now`: then her
sessions are told why and closed first.  With `--when-idle` the users still connected are
remembered and each is upgraded as soon as her last connection closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..backend import Backend, BackendError, Limits
from ..config import UsersConfig
from .registry import Registry

log = logging.getLogger("dind_gateway.upgrade")

POLL_SECONDS = 0.5
NOTICE = ("an admin is upgrading your environment to a new image; your files and images are "
          "kept. Reconnect in a moment.")


class Upgrader:
    """Carries out upgrade requests now, or when the user goes idle."""

    def __init__(self, backend: Backend, registry: Registry,
                 users: Callable[[], UsersConfig]) -> None:
        self.backend = backend
        self.registry = registry
        self.users = users
        self.pending: set[str] = set()  # upgrade when idle
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _limits(self, name: str) -> Limits | None:
        user = self.users().user(name)
        return None if user is None or user.disabled else Limits.of(user)

    async def request(self, names: list[str], *, when_idle: bool = False,
                      now: bool = False) -> list[str]:
        """One line per user: what was done, or why not."""
        out = []
        for name in names:
            limits = self._limits(name)
            if limits is None:
                out.append(f"{name}: not an enabled user, skipped")
                continue
            try:
                reason = await self.backend.outdated(name, limits)
            except BackendError as exc:
                out.append(f"{name}: {exc.user_message}")
                continue
            if reason is None:
                self.pending.discard(name)
                out.append(f"{name}: up to date")
                continue
            busy = self.registry.activity.busy(name)
            if busy and now:
                for conn in self.registry.of_user(name):
                    conn.notify_and_close(NOTICE)
                log.info("upgrade of %s --now: her sessions were told and closed", name)
            elif busy:
                if when_idle:
                    self.pending.add(name)
                    log.info("%s is outdated (%s): upgraded when she goes idle", name, reason)
                    out.append(f"{name}: outdated ({reason}); upgraded when she goes idle")
                else:
                    out.append(f"{name}: outdated ({reason}) but connected; not upgraded "
                               "(use --when-idle, or --now to close her sessions)")
                continue
            out.append(f"{name}: {await self._upgrade(name, limits, force=now)}")
        return out

    async def _upgrade(self, name: str, limits: Limits, *, force: bool = False) -> str:
        busy = None if force else (lambda: self.registry.activity.busy(name))
        try:
            done = await self.backend.upgrade(name, limits, unless=busy)
        except BackendError as exc:
            log.error("upgrade of %s failed: %s", name, exc)
            return f"upgrade failed: {exc.user_message}"
        if done != "in use: not upgraded":
            self.pending.discard(name)
        log.info("upgrade of %s: %s", name, done)
        return done

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            for name in sorted(self.pending):
                if self.registry.activity.busy(name):
                    continue
                limits = self._limits(name)
                if limits is None:
                    self.pending.discard(name)
                    continue
                try:
                    await self._upgrade(name, limits)
                except Exception:  # noqa: BLE001 - the loop must outlive one bad upgrade
                    log.exception("upgrade of %s failed", name)
                    self.pending.discard(name)
