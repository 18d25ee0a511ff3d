"""`ssh -L` (direct-tcpip) into the user's own container, and nowhere else by default.

asyncssh's default for an accepted forward is to dial from the gateway's own network, which on
a shared server is an SSRF hole: a user could reach the host, other users' containers or the
internet through it.  Here `localhost`, `127.0.0.1`, `::1` and the user's container names are
rewritten to her container's address; anything else must be allowed by the admin
(`allow_forward_to` in gateway.yaml) and by the key's own `permitopen=`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import asyncssh
from asyncssh import ChannelOpenError

from .backend import BackendError

if TYPE_CHECKING:
    from .server import Connection

log = logging.getLogger("dind_gateway.forwarding")

_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def own_names(conn: Connection) -> set[str]:
    """Names that mean "my container" for this user."""
    user = conn.user.name
    return _LOCAL_NAMES | {f"{user}-devbox", conn.gateway.container_name(user), "devbox"}


def _permitted_by_key(conn: Connection, host: str, port: int) -> bool:
    allowed = conn.key.permitopen if conn.key is not None else None
    if allowed is None:
        return True
    return any(h in ("*", host) and p in (None, port) for h, p in allowed)


def _refuse(conn: Connection, host: str, port: int, reason: str) -> ChannelOpenError:
    log.warning("[%s] forward refused: user=%s dest=%s:%s: %s", conn.tag, conn.user.name, host,
                port, reason)
    conn.gateway.events.emit("forward.refused", conn=conn.id, user=conn.user.name, host=host,
                             port=port, reason=reason)
    return ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, reason)


def direct_tcpip(conn: Connection, host: str, port: int) -> object:
    """The answer to a direct-tcpip request: a coroutine that connects, or an exception."""
    if not conn.key_allows("port-forwarding"):
        raise _refuse(conn, host, port, "port forwarding is disabled for this key")
    if not _permitted_by_key(conn, host, port):
        raise _refuse(conn, host, port, f"{host}:{port} is not in this key's permitopen")
    own = host.lower() in own_names(conn)
    if not own and not conn.gateway.config.forward_allowed(host, port):
        raise _refuse(conn, host, port,
                      f"forwarding to {host}:{port} is not allowed; use localhost:{port} to "
                      "reach your own container")

    async def connect() -> asyncssh.SSHForwarder:
        target = host
        if own:
            try:
                state = await conn.gateway.ensure_environment(conn.user)
            except BackendError as exc:
                raise ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.user_message) from exc
            if not state.ip:
                raise ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "container has no address")
            target = state.ip
        assert conn.conn is not None
        forwarder = await conn.conn.forward_connection(target, port)
        log.info("[%s] forward: user=%s %s:%s -> %s:%s", conn.tag, conn.user.name, host, port,
                 target, port)
        conn.gateway.events.emit("forward.open", conn=conn.id, user=conn.user.name, host=host,
                                 port=port, target=f"{target}:{port}")
        conn.gateway.activity.touch(conn.user.name)
        return forwarder

    return connect()
