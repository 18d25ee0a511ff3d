"""Prometheus metrics and a health check, on a tiny HTTP server (off by default).

`Metrics` is an event sink (see gateway/events.py) that turns gateway events into counters,
gauges and a histogram in its own registry; a few gauges are read at scrape time (connections
still authenticating, banned sources, containers by state from the engine).  `MetricsServer`
answers ``GET /metrics`` and ``GET /healthz`` (200 when the backend's `health()` answers
within ``health_timeout``, else 503) with plain asyncio: no web framework for two URLs.  It has no
authentication, so bind it to loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from ..config import Address
from .events import Event

log = logging.getLogger("dind_gateway.metrics")

CONTAINER_STATES = ("created", "running", "paused", "restarting", "removing", "exited", "dead")
SESSION_TYPES = ("shell", "exec", "sftp", "scp", "rsync")
REFUSAL_REASONS = ("banned", "max_startups", "max_startups_per_source", "max_auth_tries")
READY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
_MAX_REQUEST = 16 * 1024
_REQUEST_TIMEOUT = 5.0


class Metrics:
    """The gateway's metrics, updated from events."""

    def __init__(self) -> None:
        disable_created_metrics()  # process-wide: no *_created series, they only add noise
        r = self.registry = CollectorRegistry()
        self.connections = Counter("dgw_connections", "SSH connections accepted", registry=r)
        self.connections_open = Gauge("dgw_connections_open", "SSH connections open now",
                                      registry=r)
        self.unauthenticated = Gauge("dgw_connections_unauthenticated",
                                     "Connections still authenticating (max_startups applies)",
                                     registry=r)
        self.refused = Counter("dgw_connections_refused",
                               "Connections closed by the guard, by reason", ["reason"],
                               registry=r)
        self.auth_successes = Counter("dgw_auth_successes", "Successful logins, by method",
                                      ["method"], registry=r)
        self.auth_failures = Counter("dgw_auth_failures", "Failed auth attempts, by reason",
                                     ["reason"], registry=r)
        self.bans = Counter("dgw_bans", "Source addresses banned", registry=r)
        self.banned = Gauge("dgw_banned_sources", "Source addresses banned now", registry=r)
        self.sessions = Counter("dgw_sessions", "Sessions started, by type", ["type"],
                                registry=r)
        self.sessions_active = Gauge("dgw_sessions_active", "Sessions open now, by type",
                                     ["type"], registry=r)
        self.bytes = Counter("dgw_bytes_proxied",
                             "Session bytes proxied (in: client to container), counted when a "
                             "session ends", ["direction"], registry=r)
        self.forwards = Counter("dgw_forwards", "Port forwards, by result", ["result"],
                                registry=r)
        self.container_events = Counter("dgw_container_events",
                                        "Container lifecycle events, by kind", ["kind"],
                                        registry=r)
        self.containers = Gauge("dgw_containers", "User containers by state (from the engine)",
                                ["state"], registry=r)
        self.ready = Histogram("dgw_container_ready_seconds",
                               "Time from login to a ready environment when one was started",
                               buckets=READY_BUCKETS, registry=r)
        self.docker_up = Gauge("dgw_docker_up", "1 if the Docker engine answered the last scrape",
                               registry=r)
        self.spawn_failures = Counter("dgw_spawn_failures",
                                      "Environments that failed to start or become ready, by "
                                      "reason", ["reason"], registry=r)
        self.disk_used = Gauge("dgw_disk_used_bytes", "Bytes used on a user's quota disk "
                               "(home + image cache; mounted disks only)", ["user"], registry=r)
        self.disk_quota = Gauge("dgw_disk_quota_bytes", "Size of a user's quota disk",
                                ["user"], registry=r)
        self.config_reloads = Counter("dgw_config_reloads", "users.yaml reloads, by result",
                                      ["result"], registry=r)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        for kind in SESSION_TYPES:
            self.sessions.labels(kind)
            self.sessions_active.labels(kind)
        for direction in ("in", "out"):
            self.bytes.labels(direction)
        for state in CONTAINER_STATES:
            self.containers.labels(state)

    def __call__(self, event: Event) -> None:
        name = event.get("event", "")
        if name == "connection.open":
            self.connections.inc()
            self.connections_open.inc()
        elif name == "connection.close":
            self.connections_open.dec()
        elif name == "connection.refused":
            self.refused.labels(event.get("reason", "")).inc()
        elif name == "auth.success":
            self.auth_successes.labels(event.get("method", "")).inc()
        elif name == "auth.failure":
            self.auth_failures.labels(event.get("reason") or "unknown").inc()
        elif name == "ban":
            self.bans.inc()
        elif name == "session.start":
            self.sessions.labels(event.get("type", "")).inc()
            self.sessions_active.labels(event.get("type", "")).inc()
        elif name == "session.end":
            self.sessions_active.labels(event.get("type", "")).dec()
            self.bytes.labels("in").inc(event.get("bytes_in") or 0)
            self.bytes.labels("out").inc(event.get("bytes_out") or 0)
        elif name in ("forward.open", "forward.refused"):
            self.forwards.labels(name.split(".", 1)[1]).inc()
        elif name.startswith("container."):
            if name == "container.failure":
                self.spawn_failures.labels(event.get("reason") or "unknown").inc()
            self.container_events.labels(name.split(".", 1)[1]).inc()
            if name == "container.start" and not event.get("adopted") \
                    and event.get("duration") is not None:
                self.ready.observe(event["duration"])
        elif name == "config.reload":
            self.config_reloads.labels("accepted" if event.get("accepted") else "refused").inc()

    def set_containers(self, counts: dict[str, int] | None) -> None:
        """Containers by state from the engine; None when it could not be asked."""
        self.docker_up.set(0 if counts is None else 1)
        for state in {*CONTAINER_STATES, *(counts or {})}:
            self.containers.labels(state).set((counts or {}).get(state, 0))

    def set_disks(self, usage: dict[str, tuple[int, int]]) -> None:
        """(used, quota) bytes per user with a mounted quota disk; others are dropped."""
        self.disk_used.clear()
        self.disk_quota.clear()
        for user, (used, quota) in usage.items():
            self.disk_used.labels(user).set(used)
            self.disk_quota.labels(user).set(quota)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP/1.1, one request per connection."""

    def __init__(self, metrics: Metrics, address: Address, *,
                 ping: Callable[[], Awaitable[object]],
                 container_states: Callable[[], Awaitable[dict[str, int]]] | None = None,
                 before_scrape: Callable[[], None] | None = None,
                 health_timeout: float = 2.0) -> None:
        self.metrics = metrics
        self.address = address
        self.port = address.port
        self._ping = ping
        self._container_states = container_states
        self._before_scrape = before_scrape
        self.health_timeout = health_timeout
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host = self.address.host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            log.warning("metrics endpoint on %s is not loopback; it has no authentication",
                        self.address)
        self._server = await asyncio.start_server(self._handle, host, self.address.port,
                                                  limit=_MAX_REQUEST, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def health(self) -> tuple[bool, str]:
        try:
            text = await asyncio.wait_for(self._ping(), self.health_timeout)
        except TimeoutError:
            return False, f"container engine did not answer within {self.health_timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            return False, f"container engine unreachable: {exc}"
        return True, text if isinstance(text, str) else "ok"

    async def scrape(self) -> bytes:
        if self._before_scrape is not None:
            self._before_scrape()
        if self._container_states is not None:
            try:
                counts = await asyncio.wait_for(self._container_states(), self.health_timeout)
            except Exception as exc:  # noqa: BLE001 - reported as dgw_docker_up 0
                log.debug("container states unavailable: %s", exc)
                counts = None
            self.metrics.set_containers(counts)
        return self.metrics.render()

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, await self.scrape()
            elif path == "/healthz":
                healthy, text = await self.health()
                status = "200 OK" if healthy else "503 Service Unavailable"
                ctype, body = "text/plain; charset=utf-8", (text + "\n").encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
