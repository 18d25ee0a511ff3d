"""Admin control socket: `dind-gateway ps|stop|restart|purge|reload` talk to the running gateway.

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
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backend import EnvState
from .dockerapi import DockerError

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("dind_gateway.admin")

SOCKET_NAME = "control.sock"


class AdminError(Exception):
    """A request the gateway refused; the message is for the admin."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


class AdminServer:
    """Serves the control socket for one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.path = socket_path(gateway.config.state_dir)
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

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(await reader.readline())
            try:
                result = {"ok": True, "result": await self.dispatch(request)}
            except (AdminError, DockerError) as exc:
                result = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(result).encode() + b"\n")
            await writer.drain()
        except (ValueError, ConnectionError) as exc:
            log.warning("bad admin request: %s", exc)
        finally:
            writer.close()

    async def dispatch(self, request: dict[str, Any]) -> Any:
        gw = self.gateway
        cmd, user = request.get("cmd"), request.get("user")
        if cmd == "ps":
            return await self.ps()
        if cmd == "reload":
            ok, message = await gw.reloader.reload("admin request")
            if not ok:
                raise AdminError(f"users file refused, last good configuration kept:\n{message}")
            return message
        if cmd in ("stop", "restart", "purge"):
            if not isinstance(user, str) or not user:
                raise AdminError(f"{cmd} needs a user name")
            known = gw.users.user(user)
            if cmd != "purge" and known is None:
                raise AdminError(f"no such user: {user}")
            for conn in list(gw.connections):
                if conn.authenticated and conn.user.name == user:
                    conn.notify_and_close(f"an admin ran '{cmd}' on your environment.")
            async with gw.user_lock(user):
                if cmd == "purge":
                    await gw.backend.purge(user)
                    gw.events.emit("container.purge", user=user)
                    return f"purged {user}: container, network and volumes removed"
                await gw.backend.stop(user)
            if cmd == "restart":
                assert known is not None
                await gw.ensure_environment(known)
                return f"restarted {user}"
            return f"stopped {user}"
        raise AdminError(f"unknown command {cmd!r}")

    async def ps(self) -> list[dict[str, Any]]:
        """One row per user: state, uptime, sessions, CPU %, memory, pids, image cache size."""
        gw = self.gateway
        envs = {e.user: e for e in await gw.backend.list_environments()}
        names = sorted(set(gw.users.users) | set(envs))
        sizes = await self._volume_sizes()
        stats = dict(zip(envs, await asyncio.gather(*(self._stats(e) for e in envs.values())),
                         strict=True))
        rows = []
        for name in names:
            env = envs.get(name)
            user = gw.users.user(name)
            state = env.status if env else "absent"
            if user is None:
                state += " (not in users file)"
            elif user.disabled:
                state += " (disabled)"
            row = {"user": name, "state": state, "sessions": gw.activity.sessions.get(name, 0),
                   "connections": gw.activity.connections.get(name, 0),
                   "cache_bytes": sizes.get(gw.backend.volume_names(name)["docker"]),
                   "disk": gw.backend.disk_usage(name),
                   **stats.get(name, {})}
            rows.append(row)
        return rows

    async def _volume_sizes(self) -> dict[str, int]:
        try:
            df = await self.gateway.backend.docker.request("GET", "/system/df", timeout=60)
        except DockerError:
            return {}
        return {v["Name"]: (v.get("UsageData") or {}).get("Size", -1)
                for v in df.get("Volumes") or []}

    async def _stats(self, env: EnvState) -> dict[str, Any]:
        if not env.running:
            return {}
        docker = self.gateway.backend.docker
        state = await self.gateway.backend.inspect(env.user)
        try:
            s1 = await docker.request("GET", f"/containers/{env.container_id}/stats",
                                      query={"stream": "false", "one-shot": "true"})
            await asyncio.sleep(0.5)
            s2 = await docker.request("GET", f"/containers/{env.container_id}/stats",
                                      query={"stream": "false", "one-shot": "true"})
        except DockerError:
            return {}
        cpu = s2["cpu_stats"]["cpu_usage"]["total_usage"] - s1["cpu_stats"]["cpu_usage"][
            "total_usage"]
        system = (s2["cpu_stats"].get("system_cpu_usage", 0)
                  - s1["cpu_stats"].get("system_cpu_usage", 0))
        ncpu = s2["cpu_stats"].get("online_cpus") or 1
        mem = s2.get("memory_stats", {})
        return {
            "uptime": _uptime(state.started_at),
            "cpu_percent": round(100.0 * cpu / system * ncpu, 1) if system > 0 else 0.0,
            "mem_bytes": mem.get("usage", 0) - (mem.get("stats") or {}).get("cache", 0),
            "mem_limit": state.limits.memory,
            "pids": (s2.get("pids_stats") or {}).get("current", 0),
        }


def _uptime(started: str) -> float | None:
    if not started or started.startswith("0001"):
        return None
    try:
        t = datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return None
    return max(0.0, time.time() - t.timestamp())


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
