"""Live reload of users.yaml: watch, validate as a whole, then apply the difference.

A bad edit never half-applies: the new file is parsed into a fresh UsersConfig first, and only
a fully valid one replaces the old.  Applying means: revoked keys and removed or disabled users
lose their open connections (with a one-line reason) and their containers are stopped (volumes
kept); changed limits go to running containers with `docker update`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from .backend import BackendError, Limits
from .config import ConfigError, User, UsersConfig, load_users
from .dockerapi import DockerError

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("dind_gateway.reload")

POLL_SECONDS = 1.0


def limits_of(user: User) -> Limits:
    return Limits(cpus=user.cpus, memory=user.memory, pids=user.pids, disk=user.disk)


class UsersReloader:
    """Polls the users file (mtime, size, inode) and reloads on change or on SIGHUP."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._stamp = self._file_stamp()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.gateway.config.users_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                await self.reload("file changed")

    async def reload(self, reason: str) -> tuple[bool, str]:
        """Load and apply the users file; (accepted, message)."""
        async with self._lock:
            gw = self.gateway
            path = gw.config.users_file
            try:
                new = await asyncio.to_thread(load_users, path)
            except ConfigError as exc:
                log.error("users file refused (%s), keeping the last good one: %s", reason, exc)
                gw.events.emit("config.reload", accepted=False, reason=reason, error=str(exc))
                return False, str(exc)
            if new.digest == gw.users.digest:
                log.info("users file checked (%s): unchanged", reason)
                return True, "unchanged"
            old, gw.users = gw.users, new
            summary = await self.apply(old, new)
            log.info("users file reloaded (%s): %s", reason, summary)
            gw.events.emit("config.reload", accepted=True, reason=reason, users=len(new.users),
                           changes=summary)
            return True, summary

    async def apply(self, old: UsersConfig, new: UsersConfig) -> str:
        gw = self.gateway
        changes: list[str] = []
        gone: set[str] = set()
        for name in old.users:
            now = new.user(name)
            if now is None or now.disabled:
                gone.add(name)
                changes.append(f"{name} {'removed' if now is None else 'disabled'}")
        changes += [f"{n} added" for n in new.users if n not in old.users]
        for conn in list(gw.connections):
            if not conn.authenticated:
                continue
            name = conn.user.name
            user = new.user(name)
            if name in gone or user is None:
                conn.notify_and_close("your access was removed by an admin.")
                continue
            if conn.key is not None:
                same = next((k for k in user.keys if k.key.public_data ==
                             conn.key.key.public_data), None)
                if same is None:
                    conn.notify_and_close("the key you logged in with was revoked by an admin.")
                    changes.append(f"{name}: key {conn.key.fingerprint} revoked")
                    continue
                conn.key = same
            conn.user = user
        for name in gone:
            try:
                await gw.backend.stop(name)
            except DockerError as exc:
                log.warning("could not stop %s's environment: %s", name, exc)
        for name, user in new.users.items():
            prev = old.user(name)
            if prev is not None and name not in gone and not user.disabled and \
                    limits_of(prev) != limits_of(user):
                try:
                    await gw.backend.update_limits(name, limits_of(user))
                    changes.append(f"{name} limits updated")
                except BackendError as exc:
                    log.error("limits of %s not applied: %s", name, exc.user_message)
                    changes.append(f"{name} limits refused: {exc.user_message}")
                except DockerError as exc:
                    log.warning("could not update %s's limits: %s", name, exc)
        return ", ".join(dict.fromkeys(changes)) or "no effective change"
