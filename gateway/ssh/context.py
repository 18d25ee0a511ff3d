"""What the SSH layer is given to work with: the parts it uses, never the whole application."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncssh

from ..auth import AuthorizedKey
from ..backend import Backend, EnvState, Limits
from ..backend.base import Progress
from ..config import GatewayConfig, User, UsersConfig
from ..observe.events import Events
from ..services.registry import Registry
from .certs import CertPolicy
from .guard import Guard
from .program import Principal


@dataclass
class SSHContext:
    """Shared by every connection of one listener."""

    config: GatewayConfig
    backend: Backend
    events: Events
    guard: Guard
    registry: Registry
    users: Callable[[], UsersConfig]  # the current users file (replaced on reload)
    # awaited before any environment is touched: raises (a GatewayError) while the gateway
    # has not adopted what its previous run left (the platform did not answer at start)
    ready: Callable[[], Awaitable[None]] | None = None
    certs: CertPolicy = field(init=False)  # trusted CAs and revoked_keys, from config

    def __post_init__(self) -> None:
        self.certs = CertPolicy(self.config)

    async def ensure(self, user: User, progress: Progress | None = None) -> EnvState:
        """The user's environment, started with her current limits if need be."""
        if self.ready is not None:
            await self.ready()
        return await self.backend.ensure(user.name, Limits.of(user), progress)


class ConnectionInfo(Protocol):
    """What sessions and forwarding need of their connection (ssh.server.Connection)."""

    id: int
    tag: str
    user: User
    key: AuthorizedKey | None
    ctx: SSHContext
    conn: asyncssh.SSHServerConnection | None

    @property
    def principal(self) -> Principal: ...

    @property
    def ssh_connection(self) -> str: ...

    def key_allows(self, what: str) -> bool: ...

    def forced_command(self) -> str | None: ...

    async def agent_socket(self) -> str | None: ...

    def session_closed(self, session: Any) -> None: ...
