"""Admin control socket: `dind-gateway ps|stop|restart|purge|reload|upgrade` talk to the running
gateway.

The socket lives in the state directory with mode 0600, so only the gateway's own user (root)
can drive it.  One JSON request per connection, one JSON answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..backend import Backend, BackendError, Limits
from ..config import User, UsersConfig
from .registry import Registry
from .upgrader import Upgrader

log = logging.getLogger("dind_gateway.admin")

SOCKET_NAME = "control.sock"


class AdminError(Exception):
    """A request the gateway refused; the message is for the admin."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class AdminServer:
    """Serves the control socket; acts through the backend and the registry only."""

    def __init__(self, state_dir: Path, backend: Backend, registry: Registry,
                 users: Callable[[], UsersConfig],
                 reload: Callable[[str], Awaitable[tuple[bool, str]]]) -> None:
        self.path = socket_path(state_dir)
        self.backend = backend
        self.registry = registry
        self.users = users
        self.reload = reload
        self.upgrader = Upgrader(backend, registry, users)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.upgrader.start()

    async def close(self) -> None:
        await self.upgrader.stop()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            try:
                result = {"ok": True, "result": await self.dispatch(request)}
            except AdminError as exc:
                result = {"ok": False, "error": str(exc)}
            except BackendError as exc:
                log.warning("admin request %s failed: %s", request.get("cmd"), exc)
                result = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(result).encode() + b"\n")
            await writer.drain()
        except (ValueError, ConnectionError) as exc:
            log.warning("bad admin request: %s", exc)
        finally:
            writer.close()

    async def dispatch(self, request: dict[str, Any]) -> Any:
        cmd, user = request.get("cmd"), request.get("user")
        if cmd == "ps":
            return await self.ps()
        if cmd == "reload":
            ok, message = await self.reload("admin request")
            if not ok:
                raise AdminError(f"users file refused, last good configuration kept:\n{message}")
            return message
        if cmd == "upgrade":
            return await self.upgrade(request)
        if cmd in ("stop", "restart", "purge"):
            if not isinstance(user, str) or not user:
                raise AdminError(f"{cmd} needs a user name")
            known = self.users().user(user)
            if cmd != "purge" and known is None:
                raise AdminError(f"no such user: {user}")
            for conn in self.registry.of_user(user):
                conn.notify_and_close(f"an admin ran '{cmd}' on your environment.")
            if cmd == "purge":
                await self.backend.purge(user)
                return f"purged {user}: container, network and volumes removed"
            await self.backend.stop(user)
            if cmd == "restart":
                assert known is not None
                await self.backend.ensure(user, Limits.of(known))
                return f"restarted {user}"
            return f"stopped {user}"
        raise AdminError(f"unknown command {cmd!r}")

    async def upgrade(self, request: dict[str, Any]) -> str:
        """`upgrade USER` or `upgrade --all` (every user with an environment)."""
        users = self.users()
        if request.get("all"):
            names = sorted(e.user for e in await self.backend.list_environments()
                           if e.user in users.users)
            if not names:
                return "no environments to upgrade"
        else:
            name = request.get("user")
            if not isinstance(name, str) or not name:
                raise AdminError("upgrade needs a user name or --all")
            if users.user(name) is None:
                raise AdminError(f"no such user: {name}")
            names = [name]
        lines = await self.upgrader.request(names, when_idle=bool(request.get("when_idle")),
                                            now=bool(request.get("now")))
        return "\n".join(lines)

    async def ps(self) -> list[dict[str, Any]]:
        """One row per user: state, uptime, sessions, CPU %, memory, pids, image cache, disk."""
        users = self.users()
        activity = self.registry.activity
        envs = {e.user: e for e in await self.backend.list_environments()}
        names = sorted(set(users.users) | set(envs))
        stats = await asyncio.gather(*(self.backend.stats(n) for n in names))
        outdated = await asyncio.gather(*(self._outdated(n, users, n in envs) for n in names))
        rows = []
        for name, st, stale in zip(names, stats, outdated, strict=True):
            env = envs.get(name)
            user: User | None = users.user(name)
            state = env.status if env else "absent"
            if user is None:
                state += " (not in users file)"
            elif user.disabled:
                state += " (disabled)"
            rows.append({"user": name, "state": state,
                         "sessions": activity.sessions.get(name, 0),
                         "connections": activity.connections.get(name, 0),
                         "logins": sorted({c.login for c in self.registry.of_user(name)}),
                         "cache_bytes": st.cache_bytes, "disk": st.disk,
                         "outdated": stale,
                         "upgrade_pending": name in self.upgrader.pending,
                         **{k: v for k, v in st.as_row().items()
                            if k not in ("cache_bytes", "disk")}})
        return rows

    async def _outdated(self, name: str, users: UsersConfig, exists: bool) -> str | None:
        user = users.user(name)
        if not exists or user is None:
            return None
        try:
            return await self.backend.outdated(name, Limits.of(user))
        except BackendError as exc:
            return f"unknown ({exc.user_message})"


def call(state_dir: Path, request: dict[str, Any], timeout: float = 120) -> Any:
    """Client side: send one request to the running gateway, return its result."""
    path = socket_path(state_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise AdminError(f"cannot reach the gateway at {path} ({exc.strerror}); "
                             "is `dind-gateway serve` running with this config?") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"{}")
    if not answer.get("ok"):
        raise AdminError(answer.get("error", "no answer from the gateway"))
    return answer["result"]
