"""Live reload of users.yaml: watch, validate as a whole, diff, then apply the difference.

A bad edit never half-applies: the new file is parsed into a fresh UsersConfig first, and only
a fully valid one replaces the old.  `diff` is pure (old users, new users, live connections →
a `Plan`); `apply` carries a plan out: revoked keys and removed or disabled users lose their
open connections (with a one-line reason) and their environments are stopped (data kept);
changed limits go to running environments live; a changed image or group membership applies
when her environment is next made (its next start, or `dind-gateway upgrade`), and the log
says so.  Every image the file names must be on the engine, or the edit is refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..auth import AuthorizedKey
from ..backend import Backend, BackendError, Limits
from ..config import ConfigError, ConfigErrors, User, UsersConfig, load_users
from ..observe.events import Events
from .registry import LiveConnection, Registry

log = logging.getLogger("dind_gateway.reload")

POLL_SECONDS = 1.0


@dataclass
class Plan:
    """What a new users file changes, computed without touching anything."""

    changes: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # users removed or disabled
    close: list[tuple[LiveConnection, str]] = field(default_factory=list)  # conn, message
    rebind: list[tuple[LiveConnection, User, AuthorizedKey | None]] = field(
        default_factory=list)
    limits: dict[str, Limits] = field(default_factory=dict)


def diff(old: UsersConfig, new: UsersConfig, live: Iterable[LiveConnection]) -> Plan:
    """The plan that takes the gateway from `old` to `new` with these connections open."""
    plan = Plan()
    for name in old.users:
        now = new.user(name)
        if now is None or now.disabled:
            plan.stop.append(name)
            plan.changes.append(f"{name} {'removed' if now is None else 'disabled'}")
    plan.changes += [f"{n} added" for n in new.users if n not in old.users]
    for conn in live:
        if not conn.authenticated:
            continue
        name = conn.user.name
        user = new.user(name)
        if name in plan.stop or user is None:
            plan.close.append((conn, "your access was removed by an admin."))
            continue
        key = conn.key
        if key is not None:
            key = next((k for k in user.keys if k.key.public_data == key.key.public_data),
                       None)
            if key is None:
                plan.close.append((conn, "the key you logged in with was revoked by an "
                                         "admin."))
                plan.changes.append(f"{name}: key {conn.key.fingerprint} revoked")
                continue
        plan.rebind.append((conn, user, key))
    for name, user in new.users.items():
        prev = old.user(name)
        if prev is None or name in plan.stop or user.disabled:
            continue
        if Limits.of(prev).caps != Limits.of(user).caps:
            plan.limits[name] = Limits.of(user)
        if prev.shell != user.shell:
            plan.changes.append(f"{name} shell changed (new sessions)")
        plan.changes += _made_from_changes(name, prev, user)
    return plan


def _made_from_changes(name: str, prev: User, user: User) -> list[str]:
    """Image and group changes: they apply when her container is next made (at its next
    start, or `dind-gateway upgrade`), never to a running one."""
    out = []
    when = f"at her next container start, or `dind-gateway upgrade {name}`"
    if prev.image != user.image:
        out.append(f"{name} image {prev.image or 'default'} -> {user.image or 'default'} "
                   f"({when})")
    joined = [g for g in user.groups if g not in prev.groups]
    left = [g for g in prev.groups if g not in user.groups]
    if joined or left:
        parts = ([f"joins {', '.join(joined)}"] if joined else []) + (
            [f"leaves {', '.join(left)}"] if left else [])
        out.append(f"{name} {' and '.join(parts)} ({when})")
    elif prev.volumes != user.volumes:
        out.append(f"{name} group volumes changed ({when})")
    return out


class UsersReloader:
    """Polls the users file (mtime, size, inode) and reloads on change or on SIGHUP."""

    def __init__(self, path: Path, users: Callable[[], UsersConfig],
                 replace: Callable[[UsersConfig], None], backend: Backend,
                 registry: Registry, events: Events) -> None:
        self.path = path
        self.users = users
        self.replace = replace
        self.backend = backend
        self.registry = registry
        self.events = events
        self._stamp = self._file_stamp()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
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
            try:
                new = await asyncio.to_thread(load_users, self.path)
            except ConfigError as exc:
                log.error("users file refused (%s), keeping the last good one: %s", reason, exc)
                self.events.emit("config.reload", accepted=False, reason=reason, error=str(exc))
                return False, str(exc)
            old = self.users()
            if new.digest == old.digest:
                log.info("users file checked (%s): unchanged", reason)
                return True, "unchanged"
            try:
                await self.check_images(new)
            except ConfigError as exc:
                log.error("users file refused (%s), keeping the last good one: %s", reason, exc)
                self.events.emit("config.reload", accepted=False, reason=reason, error=str(exc))
                return False, str(exc)
            self.replace(new)
            summary = await self.apply(diff(old, new, self.registry.connections()))
            log.info("users file reloaded (%s): %s", reason, summary)
            self.events.emit("config.reload", accepted=True, reason=reason,
                             users=len(new.users), changes=summary)
            return True, summary

    async def check_images(self, new: UsersConfig) -> None:
        """Every `image:` of the file must be on the engine now: else the edit is refused,
        naming file:line: field (a missing image would fail her next login instead)."""
        problems = []
        for ref in dict.fromkeys(i.ref for i in new.images):
            try:
                why = await self.backend.check_image(ref)
            except BackendError as exc:
                why = f"cannot ask the engine about image {ref!r}: {exc.user_message}"
            if why is not None:
                problems += [ConfigError(new.path, i.line, i.field, why)
                             for i in new.images if i.ref == ref]
        if problems:
            problems.sort(key=lambda e: e.line or 0)
            raise problems[0] if len(problems) == 1 else ConfigErrors(problems)

    async def apply(self, plan: Plan) -> str:
        changes = list(plan.changes)
        for conn, message in plan.close:
            conn.notify_and_close(message)
        for conn, user, key in plan.rebind:
            conn.user, conn.key = user, key
        for name in plan.stop:
            try:
                await self.backend.stop(name)
            except BackendError as exc:
                log.warning("could not stop %s's environment: %s", name, exc)
        for name, limits in plan.limits.items():
            try:
                await self.backend.update_limits(name, limits)
                changes.append(f"{name} limits updated")
            except BackendError as exc:
                log.error("limits of %s not applied: %s", name, exc)
                changes.append(f"{name} limits refused: {exc.user_message}")
        return ", ".join(dict.fromkeys(changes)) or "no effective change"
