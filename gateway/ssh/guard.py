"""Admission control before login: bans, startups, penalties, MaxAuthTries (asyncssh has none).

The rules, all per process and in memory:

* **Bans.**  A *failed login* is a connection that tried to authenticate and failed at least
  once; it counts the moment its first attempt fails (so the next connection already sees it)
  and is taken back if the same connection then logs in (a user whose agent offers the wrong
  key first is not punished).  ``ban_threshold`` failed logins from one source within
  ``failure_window`` ban the source for ``ban_seconds``; every repeat doubles the ban, up to
  ``ban_max_seconds``, until the source has stayed quiet for ``forget_after``.  A banned
  source's new connections are closed before the SSH handshake, and its connections still
  authenticating are dropped.  A source is an IPv4 address or an IPv6 /64.
* **Startups.**  At most ``max_startups`` connections may be unauthenticated at once, and
  ``max_startups_per_source`` from one source (like OpenSSH's MaxStartups and
  PerSourceMaxStartups).  When the table is full a new connection does not lose: it evicts
  the oldest one that has not even sent its SSH version line (then: the oldest of the source
  holding most slots), so a flood of silent sockets cannot lock real users out.  A client has
  ``ident_timeout`` to send its version line; asyncssh's ``login_timeout``
  (``login_grace_time``) bounds the whole login.
* **Penalties** (OpenSSH 9.8's PerSourcePenalties idea, for DHEat-style floods): every
  connection a source leaves without logging in counts one point; points drain at
  ``noauth_per_second``; a source holding more than ``noauth_burst`` points is refused at once
  until they drain.  A team that logs in is never penalised, however many connections it opens.
* **Trusted sources** (``trusted_sources``: CI runners, an office NAT) skip the per-source cap
  and the penalties; bans still apply to them.
* **Attempts.**  The ``max_auth_tries``-th failed attempt on one connection disconnects it.

Decisions are announced as events (``connection.refused``, ``ban``) for the audit log and
metrics; the table of sources is bounded so a spoofing flood cannot grow memory without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncssh

from ..config import GatewayConfig
from ..observe.events import Events

log = logging.getLogger("dind_gateway.guard")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_SOURCES = 50_000  # remembered addresses; the least recently seen go first


class Closable(Protocol):
    """What the guard needs of a connection: asyncssh's SSHServerConnection fits."""

    def disconnect(self, code: int, reason: str) -> None: ...


def source_of(peer: str) -> str:
    """The unit a ban applies to: the IPv4 address, or the /64 of an IPv6 one."""
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass
class _Source:
    failures: int = 0  # failed logins since the last ban (or failure_window of quiet)
    last_failure: float = 0.0
    strikes: int = 0  # bans so far; the next one lasts ban_seconds * 2**strikes
    banned_until: float = 0.0
    noauth: float = 0.0  # penalty points (connections left unauthenticated), draining
    noauth_at: float = 0.0  # when `noauth` was last brought up to date


@dataclass
class _Pending:
    """A connection that has not logged in yet."""

    peer: str
    source: str
    conn: Closable | None
    opened: float = 0.0
    versioned: Callable[[], bool] | None = None  # has it sent its SSH version line?
    trusted: bool = False
    attempts: int = 0  # failed auth attempts on this connection
    counted: bool = False  # already counted as one failed login of its source


class Guard:
    """Ban table, unauthenticated-connection counts and per-connection attempt counts."""

    def __init__(self, events: Events, *, max_startups: int, max_startups_per_source: int,
                 max_auth_tries: int, ban_threshold: int, ban_seconds: float,
                 ban_max_seconds: float, failure_window: float = 3600.0,
                 forget_after: float = 86400.0, max_sources: int = MAX_SOURCES,
                 ident_timeout: float = 10.0, noauth_burst: int = 20,
                 noauth_per_second: float = 2.0, trusted_sources: Sequence[Network] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self.max_startups = max_startups
        self.max_startups_per_source = max_startups_per_source
        self.max_auth_tries = max_auth_tries
        self.ban_threshold = ban_threshold
        self.ban_seconds = ban_seconds
        self.ban_max_seconds = max(ban_max_seconds, ban_seconds)
        self.failure_window = failure_window
        self.forget_after = forget_after
        self.max_sources = max_sources
        self.ident_timeout = ident_timeout
        self.noauth_burst = noauth_burst
        self.noauth_per_second = noauth_per_second
        self.trusted_sources = tuple(trusted_sources)
        self._clock = clock
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._pending: dict[int, _Pending] = {}
        self._pending_by_source: Counter[str] = Counter()

    @classmethod
    def from_config(cls, config: GatewayConfig, events: Events, **kw: object) -> Guard:
        return cls(events, max_startups=config.max_startups,
                   max_startups_per_source=config.max_startups_per_source,
                   max_auth_tries=config.max_auth_tries, ban_threshold=config.ban_threshold,
                   ban_seconds=config.ban_seconds, ban_max_seconds=config.ban_max_seconds,
                   ident_timeout=config.ident_timeout, noauth_burst=config.noauth_burst,
                   noauth_per_second=config.noauth_per_second,
                   trusted_sources=config.trusted_sources, **kw)  # type: ignore[arg-type]

    # --- what the metrics read --------------------------------------------------------------

    @property
    def unauthenticated(self) -> int:
        return len(self._pending)

    def banned_sources(self) -> int:
        now = self._clock()
        return sum(1 for s in self._sources.values() if s.banned_until > now)

    def ban_remaining(self, peer: str) -> float:
        """Seconds left on the ban of this peer's source; 0 when not banned."""
        record = self._sources.get(source_of(peer))
        return max(0.0, record.banned_until - self._clock()) if record else 0.0

    # --- connection lifecycle ----------------------------------------------------------------

    def trusted(self, peer: str) -> bool:
        try:
            addr = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted_sources)

    def admit(self, conn_id: int, peer: str, conn: Closable | None = None,
              versioned: Callable[[], bool] | None = None) -> str | None:
        """Let a new connection in (None) or say why it must be closed right away.

        `versioned` tells whether the connection has sent its SSH version line yet (for
        eviction and the ident deadline)."""
        source = source_of(peer)
        trusted = self.trusted(peer)
        now = self._clock()
        reason = None
        if self.ban_remaining(peer) > 0:
            self._sources.move_to_end(source)
            reason = "banned"
        elif not trusted and self._penalty(source, now) >= self.noauth_burst:
            reason = "penalty"
        elif not trusted and self._pending_by_source[source] >= self.max_startups_per_source:
            reason = "max_startups_per_source"
        elif len(self._pending) >= self.max_startups and not self._evict_one():
            reason = "max_startups"
        if reason is not None:
            log.debug("[conn=%d] refused %s: %s", conn_id, peer, reason)
            self.events.emit("connection.refused", conn=conn_id, peer=peer, reason=reason)
            return reason
        self._pending[conn_id] = _Pending(peer, source, conn, now, versioned, trusted)
        self._pending_by_source[source] += 1
        if versioned is not None and conn is not None:
            with contextlib.suppress(RuntimeError):  # no loop (unit tests)
                asyncio.get_running_loop().call_later(self.ident_timeout,
                                                      self._ident_deadline, conn_id)
        return None

    def _ident_deadline(self, conn_id: int) -> None:
        pending = self._pending.get(conn_id)
        if pending is None or pending.versioned is None or pending.versioned():
            return
        self.events.emit("connection.refused", conn=conn_id, peer=pending.peer,
                         reason="ident_timeout")
        self._add_point(pending)
        self._drop(conn_id, asyncssh.DISC_PROTOCOL_ERROR, "No identification string received")

    def _evict_one(self) -> bool:
        """Free one startup slot for a newcomer: the oldest connection that has not sent its
        version line, else the oldest of the source holding most slots (if it holds two or
        more).  False when nobody should make room."""
        silent = [(p.opened, cid) for cid, p in self._pending.items()
                  if p.versioned is not None and not p.versioned()]
        if silent:
            victim = min(silent)[1]
        else:
            source, held = max(self._pending_by_source.items(), key=lambda kv: kv[1],
                               default=("", 0))
            if held < 2:
                return False
            victim = min((p.opened, cid) for cid, p in self._pending.items()
                         if p.source == source)[1]
        pending = self._pending[victim]
        log.info("[conn=%d] evicted %s to make room for a new connection", victim, pending.peer)
        self.events.emit("connection.refused", conn=victim, peer=pending.peer, reason="evicted")
        if pending.versioned is not None and not pending.versioned():
            self._add_point(pending)  # a silent socket; one that was talking is a victim
        self._drop(victim, asyncssh.DISC_TOO_MANY_CONNECTIONS, "Too many connections")
        return True

    def _penalty(self, source: str, now: float) -> float:
        """The source's penalty points, drained up to now."""
        record = self._sources.get(source)
        if record is None:
            return 0.0
        drained = (now - record.noauth_at) * self.noauth_per_second
        record.noauth, record.noauth_at = max(0.0, record.noauth - drained), now
        return record.noauth

    def auth_failed(self, conn_id: int) -> None:
        """One failed attempt on this connection (call after emitting auth.failure)."""
        pending = self._pending.get(conn_id)
        if pending is None:
            return
        pending.attempts += 1
        if not pending.counted:
            pending.counted = True
            self._count_failure(pending.source, pending.peer)
        if conn_id in self._pending and pending.attempts >= self.max_auth_tries:
            log.warning("[conn=%d] %s: too many authentication failures (%d)", conn_id,
                        pending.peer, pending.attempts)
            self.events.emit("connection.refused", conn=conn_id, peer=pending.peer,
                             reason="max_auth_tries")
            self._drop(conn_id, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                       "Too many authentication failures")

    def auth_succeeded(self, conn_id: int) -> None:
        """The connection logged in: it no longer holds a startup slot or counts as failed."""
        pending = self._release(conn_id)
        if pending is not None and pending.counted:
            record = self._sources.get(pending.source)
            if record is not None and record.failures > 0:
                record.failures -= 1

    def closed(self, conn_id: int) -> None:
        """The connection is gone (whether or not it logged in); one that never logged in
        costs its source a penalty point."""
        pending = self._release(conn_id)
        if pending is not None:
            self._add_point(pending)

    def _add_point(self, pending: _Pending) -> None:
        if pending.trusted:
            return
        now = self._clock()
        record = self._record(pending.source, now)
        self._penalty(pending.source, now)
        record.noauth += 1
        if record.noauth >= self.noauth_burst and record.noauth - 1 < self.noauth_burst:
            log.warning("throttling %s: %d connections left without logging in",
                        pending.source, int(record.noauth))
            self.events.emit("penalty", peer=pending.peer, source=pending.source,
                             points=round(record.noauth, 1))

    # --- internals ------------------------------------------------------------------------

    def _release(self, conn_id: int) -> _Pending | None:
        pending = self._pending.pop(conn_id, None)
        if pending is not None:
            self._pending_by_source[pending.source] -= 1
            if self._pending_by_source[pending.source] <= 0:
                del self._pending_by_source[pending.source]
        return pending

    def _record(self, source: str, now: float) -> _Source:
        record = self._sources.get(source)
        if record is None:
            record = self._sources[source] = _Source()
            if len(self._sources) > self.max_sources:
                self._prune(now)
        else:
            self._sources.move_to_end(source)
        return record

    def _prune(self, now: float) -> None:
        """Forget sources with nothing to remember, then the least recently seen ones."""
        for key in [k for k, r in self._sources.items() if self._stale(r, now)]:
            del self._sources[key]
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)

    def _stale(self, record: _Source, now: float) -> bool:
        quiet_since = max(record.last_failure, record.banned_until)
        if record.banned_until > now:
            return False
        if record.noauth - (now - record.noauth_at) * self.noauth_per_second > 0:
            return False
        if record.strikes:
            return now - quiet_since > self.forget_after
        return now - record.last_failure > self.failure_window

    def _count_failure(self, source: str, peer: str) -> None:
        now = self._clock()
        record = self._record(source, now)
        if record.strikes and now - max(record.last_failure, record.banned_until) \
                > self.forget_after:
            record.strikes = 0
        if now - record.last_failure > self.failure_window:
            record.failures = 0
        record.failures += 1
        record.last_failure = now
        if record.failures < self.ban_threshold or record.banned_until > now:
            return
        seconds = min(self.ban_seconds * 2 ** record.strikes, self.ban_max_seconds)
        failures, record.failures = record.failures, 0
        record.strikes += 1
        record.banned_until = now + seconds
        log.warning("banned %s for %g s after %d failed logins (ban #%d)", source, seconds,
                    failures, record.strikes)
        self.events.emit("ban", peer=peer, source=source, seconds=seconds, failures=failures,
                         strikes=record.strikes)
        for conn_id, pending in list(self._pending.items()):
            if pending.source == source:
                self._drop(conn_id, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                           "Too many authentication failures")

    def _drop(self, conn_id: int, code: int, reason: str) -> None:
        pending = self._release(conn_id)
        if pending is None or pending.conn is None:
            return
        # Not from inside asyncssh's auth handler: let it send its answer first.
        try:
            asyncio.get_running_loop().call_soon(pending.conn.disconnect, code, reason)
        except RuntimeError:  # no loop (unit tests)
            pending.conn.disconnect(code, reason)
