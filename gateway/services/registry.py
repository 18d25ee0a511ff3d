"""Who is connected: live connections, and activity per user (for culling and max_sessions).

The SSH layer registers each authenticated connection here; services (reloader, admin, culler)
read and act on connections through the small `LiveConnection` protocol, never through the SSH
server itself.  Activity is counted per user as open authenticated SSH connections (an
`ssh -N -L` tunnel keeps its container alive as much as a shell does).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Protocol

from ..auth import AuthorizedKey
from ..config import User


class LiveConnection(Protocol):
    """What services need of one client connection."""

    authenticated: bool
    user: User
    key: AuthorizedKey | None

    @property
    def login(self) -> str:
        """How it logged in, for `ps`: a certificate's key id, a key's fingerprint, password."""
        ...

    def notify_and_close(self, message: str) -> None:
        """One line to every open session's stderr, then a disconnect carrying it too."""
        ...


class Activity:
    """Open connections and sessions per user, and when each user was last active."""

    def __init__(self) -> None:
        self.connections: dict[str, int] = defaultdict(int)
        self.sessions: dict[str, int] = defaultdict(int)
        self.last_active: dict[str, float] = {}

    def touch(self, user: str) -> None:
        self.last_active[user] = time.monotonic()

    def connection_opened(self, user: str) -> None:
        self.connections[user] += 1
        self.touch(user)

    def connection_closed(self, user: str) -> None:
        self.connections[user] = max(0, self.connections[user] - 1)
        self.touch(user)

    def session_opened(self, user: str) -> None:
        self.sessions[user] += 1
        self.touch(user)

    def session_closed(self, user: str) -> None:
        self.sessions[user] = max(0, self.sessions[user] - 1)
        self.touch(user)

    def busy(self, user: str) -> bool:
        return self.connections.get(user, 0) > 0

    def idle_for(self, user: str) -> float:
        """Seconds since the user was last active (since adoption if never seen)."""
        return time.monotonic() - self.last_active.setdefault(user, time.monotonic())


class Registry:
    """The live connections of this gateway process and their activity."""

    def __init__(self) -> None:
        self.activity = Activity()
        self._connections: set[LiveConnection] = set()

    def add(self, conn: LiveConnection) -> None:
        self._connections.add(conn)

    def discard(self, conn: LiveConnection) -> None:
        self._connections.discard(conn)

    def connections(self) -> list[LiveConnection]:
        return list(self._connections)

    def of_user(self, name: str) -> list[LiveConnection]:
        return [c for c in self._connections if c.authenticated and c.user.name == name]

    def __len__(self) -> int:
        return len(self._connections)
