"""A tiny in-process event bus: the gateway says what happened, sinks decide what to keep.

Audit logging and metrics subscribe here instead of being called from the data path, so the
proxy code stays about moving bytes (ContainerSSH's "wrap, don't sprinkle" idea).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("dind_gateway.events")

Event = dict[str, Any]
Sink = Callable[[Event], None]

# Event names, for reference (fields in brackets are always present):
#   connection.open / connection.close     [conn, peer]
#   connection.refused                     [conn, peer, reason] (guard: banned, max_startups,
#                                          max_startups_per_source, max_auth_tries)
#   auth.success / auth.failure            [conn, peer, user, method] key, reason
#   session.start / session.end            [conn, user, type] command, exit_status, bytes_in,
#                                          bytes_out, duration
#   session.refused                        [conn, user, reason] (max_sessions)
#   forward.open / forward.refused         [conn, user, host, port] reason, direction (remote
#                                          for a refused -R)
#   container.create / container.start / container.stop / container.cull
#                                          [user] duration, container
#   config.reload                          [accepted] error, users
#   ban                                    [peer, seconds, failures] source, strikes


class Events:
    """Fan-out of events to subscribed sinks; a failing sink is logged, never raised."""

    def __init__(self) -> None:
        self._sinks: list[Sink] = []

    def subscribe(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def emit(self, event: str, **fields: Any) -> None:
        record: Event = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                         "event": event, **fields}
        for sink in self._sinks:
            try:
                sink(record)
            except Exception:  # noqa: BLE001 - a sink must not break a session
                log.exception("event sink failed on %s", event)
