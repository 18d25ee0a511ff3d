"""The audit log: every gateway event as one JSON line, in a size-capped, rotated file.

It is an event sink (see gateway/events.py): the proxy code never writes here directly.
Each line carries ``time``, ``event``, ``conn``, ``peer`` and ``user`` (null where they do not
apply, e.g. container events), then the event's own fields.  Events of a connection that lack
the peer or user (sessions, forwards) get them from that connection's earlier events.

Rotation is by size, like logging's RotatingFileHandler: when a line would take the file past
``max_bytes`` it becomes ``audit.log.1`` (older ones shift up, the oldest beyond ``backups``
is deleted), so the log can never take more than about ``(backups + 1) * max_bytes``.
Files are created mode 0600: they name users and their addresses.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ..config import GatewayConfig
from ..errors import os_reason
from .events import Event

log = logging.getLogger("dind_gateway.audit")

# Refused connections are counted by the metrics and logged at debug level, but not audited:
# a flood would otherwise rotate the useful history away.  Bans are audited.
SKIPPED = frozenset({"connection.refused"})
_HEAD = ("time", "event", "conn", "peer", "user")
_ERROR_LOG_INTERVAL = 60.0


class AuditLog:
    """Event sink writing JSON lines to a rotated file and/or standard output."""

    def __init__(self, path: Path | None, *, stdout: bool = False,
                 max_bytes: int = 50 * 2**20, backups: int = 5,
                 stream: IO[str] | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._stream = (stream or sys.stdout) if stdout else None
        self._fd: int | None = None
        self._size = 0
        self._peers: dict[Any, str] = {}
        self._users: dict[Any, str] = {}
        self._last_error = 0.0
        self._dropped = 0  # events lost since the file last failed (0: not degraded)
        self._degraded_at = 0.0

    @classmethod
    def from_config(cls, config: GatewayConfig) -> AuditLog | None:
        if config.audit_log is None and not config.audit_stdout:
            return None
        return cls(config.audit_log, stdout=config.audit_stdout,
                   max_bytes=config.audit_max_size, backups=config.audit_backups)

    def __call__(self, event: Event) -> None:
        name = event.get("event")
        if name in SKIPPED:
            return
        record = self._enrich(event)
        line = json.dumps(record, default=str, ensure_ascii=False) + "\n"
        if self._stream is not None:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self._error("audit stdout", exc)
        if self.path is not None:
            self._write(line.encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- internals --------------------------------------------------------------------------

    def _enrich(self, event: Event) -> dict[str, Any]:
        conn = event.get("conn")
        name = event.get("event")
        if conn is not None:
            if name == "connection.open" and event.get("peer"):
                self._peers[conn] = event["peer"]
            elif name == "auth.success" and event.get("user"):
                self._users[conn] = event["user"]
        record = {key: event.get(key) for key in _HEAD}
        if conn is not None:
            if record["peer"] is None:
                record["peer"] = self._peers.get(conn)
            if record["user"] is None:
                record["user"] = self._users.get(conn)
            if name == "connection.close":
                self._peers.pop(conn, None)
                self._users.pop(conn, None)
        record.update((k, v) for k, v in event.items() if k not in record)
        return record

    def _open(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _write(self, data: bytes) -> None:
        gap = self._dropped
        try:  # after a gap, its record and this event go in together, or neither
            self._append(self._gap_record() + data if gap else data)
        except OSError as exc:
            self._degrade(exc)
            self.close()  # reopen next time: the disk may have room again
            return
        if gap:
            log.warning("audit log %s is written again; %d audit event(s) were lost while "
                        "it could not be", self.path, gap)
            self._dropped = 0

    def _append(self, data: bytes) -> None:
        """One whole line or nothing: a short write (a nearly full disk) is cut back off."""
        if self._fd is None:
            self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        assert self._fd is not None
        written = os.write(self._fd, data)
        if written < len(data):
            os.ftruncate(self._fd, self._size)
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        self._size += len(data)

    def _degrade(self, exc: OSError) -> None:
        """The first failure is logged once, as one warning; then events are only counted."""
        if not self._dropped:
            self._degraded_at = time.time()
            log.warning("audit log degraded: cannot write %s (%s); audit events are dropped "
                        "and counted until it can be written again; logins and sessions go "
                        "on", self.path, os_reason(exc))
        self._dropped += 1

    def _gap_record(self) -> bytes:
        """What the audit log itself says of a gap: when it began, how many events it lost."""
        return (json.dumps({"time": _iso(time.time()), "event": "audit.recovered",
                            "conn": None, "peer": None, "user": None, "dropped": self._dropped,
                            "since": _iso(self._degraded_at)}) + "\n").encode()

    def _rotate(self) -> None:
        assert self.path is not None
        self.close()
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
        else:
            name = str(self.path)
            for i in range(self.backups - 1, 0, -1):
                if os.path.exists(f"{name}.{i}"):
                    os.replace(f"{name}.{i}", f"{name}.{i + 1}")
            os.replace(name, f"{name}.1")
        self._open()

    def _error(self, where: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error > _ERROR_LOG_INTERVAL:
            self._last_error = now
            log.error("cannot write the audit log (%s): %s", where, exc)


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
