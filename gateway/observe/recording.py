"""Session recording: a user's pty session written as an asciicast v2 file.

Opt-in per user or group (`record: true` in users.yaml); she is told at login.  Only what the
terminal showed is kept (output and resizes), never what she typed: keystrokes carry passwords
that the terminal does not echo.  Format: https://docs.asciinema.org/manual/asciicast/v2/ — a
JSON header line, then one JSON array per event, `[seconds, "o", text]` or `[seconds, "r",
"COLSxROWS"]`; `asciinema play FILE` plays it.  Files are 0600 in a 0700 directory per user;
a recording stops growing at its size cap (the session goes on, the audit log says so).
"""

from __future__ import annotations

import codecs
import itertools
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from .events import Events

log = logging.getLogger("dind_gateway.recording")
_serial = itertools.count(1)  # sessions of one connection (multiplexing) get their own file


class Recording:
    """One asciicast file being written; every method is cheap and never raises."""

    def __init__(self, path: Path, fh: IO[bytes], *, max_size: int, events: Events,
                 conn: int, user: str) -> None:
        self.path = path
        self._fh: IO[bytes] | None = fh
        self._max = max_size
        self._events = events
        self._conn, self._user = conn, user
        self._start = time.monotonic()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.size = 0
        self.truncated = False

    @classmethod
    def open(cls, directory: Path, *, user: str, conn: int, width: int, height: int,
             term: str, command: str | None, max_size: int, events: Events,
             ) -> Recording | None:
        """Start a recording, or None (logged) if the file cannot be made: a full or broken
        state disk must not keep her out, but the audit log records that it failed."""
        now = datetime.now(UTC)
        udir = directory / user
        name = f"{now:%Y%m%dT%H%M%S.%fZ}-c{conn}-{next(_serial)}.cast"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            udir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(udir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.error("cannot record the session of %s in %s: %s", user, udir, exc)
            events.emit("recording.failed", conn=conn, user=user, path=str(udir / name),
                        error=str(exc))
            return None
        rec = cls(udir / name, os.fdopen(fd, "wb", buffering=64 * 1024), max_size=max_size,
                  events=events, conn=conn, user=user)
        header = {"version": 2, "width": width, "height": height,
                  "timestamp": int(now.timestamp()), "env": {"TERM": term or "xterm"},
                  "title": f"{user}: {command}" if command else f"{user}: shell"}
        rec._line(header)
        events.emit("recording.start", conn=conn, user=user, path=str(rec.path))
        return rec

    def output(self, data: bytes) -> None:
        """What the terminal showed (pty sessions have one output stream)."""
        text = self._decoder.decode(data)
        if text:
            self._event("o", text)

    def resize(self, width: int, height: int) -> None:
        self._event("r", f"{width}x{height}")

    def close(self) -> None:
        """Flush and close; the audit log gets the file's size and whether it was cut."""
        if self._fh is None:
            return
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._event("o", tail)
        fh, self._fh = self._fh, None
        try:
            fh.close()
        except OSError as exc:
            log.error("recording %s: %s", self.path, exc)
        self._events.emit("recording.end", conn=self._conn, user=self._user,
                          path=str(self.path), bytes=self.size, truncated=self.truncated)

    def _event(self, code: str, data: str) -> None:
        if self._fh is None or self.truncated:
            return
        self._line([round(time.monotonic() - self._start, 6), code, data])

    def _line(self, obj: object) -> None:
        assert self._fh is not None
        line = (json.dumps(obj, ensure_ascii=False) + "\n").encode()
        if self.size + len(line) > self._max and self.size:
            self.truncated = True
            log.warning("recording %s reached its cap (%d B); the rest is not recorded",
                        self.path, self._max)
            self._events.emit("recording.truncated", conn=self._conn, user=self._user,
                              path=str(self.path), bytes=self.size)
            return
        try:
            self._fh.write(line)
        except OSError as exc:
            # A full disk: stop recording, keep the session (the audit line says it was cut).
            log.error("recording %s: %s; the rest is not recorded", self.path, exc)
            self.truncated = True
            return
        self.size += len(line)
