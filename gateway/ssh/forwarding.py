"""`ssh -L` (direct-tcpip) into the user's own environment, and nowhere else by default.

asyncssh's default for an accepted forward is to dial from the gateway's own network, which on
a shared server is an SSRF hole: a user could reach the host, other users' containers or the
internet through it.  Here `localhost`, `127.0.0.1`, `::1` and the user's container names are
connected through the backend (`open_connection`: into her environment); anything else must
be allowed by the admin (`allow_forward_to` in gateway.yaml) and by the key's own
`permitopen=`, and is dialled from the gateway.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import asyncssh
from asyncssh import ChannelOpenError
from asyncssh.forward import SSHForwarder

from ..errors import GatewayError
from .context import ConnectionInfo

log = logging.getLogger("dind_gateway.forwarding")

def _permitted_by_key(conn: ConnectionInfo, host: str, port: int) -> bool:
    allowed = conn.key.permitopen if conn.key is not None else None
    if allowed is None:
        return True
    return any(h in ("*", host) and p in (None, port) for h, p in allowed)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _refuse(conn: ConnectionInfo, host: str, port: int, reason: str) -> ChannelOpenError:
    log.warning("[%s] forward refused: user=%s dest=%s:%s: %s", conn.tag, conn.user.name, host,
                port, reason)
    conn.ctx.events.emit("forward.refused", conn=conn.id, user=conn.user.name, host=host,
                         port=port, reason=reason)
    return ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, reason)


def direct_tcpip(conn: ConnectionInfo, host: str, port: int) -> object:
    """The answer to a direct-tcpip request: a coroutine that connects, or an exception."""
    if not conn.key_allows("port-forwarding"):
        raise _refuse(conn, host, port, "port forwarding is disabled for this key")
    if not _permitted_by_key(conn, host, port):
        raise _refuse(conn, host, port, f"{host}:{port} is not in this key's permitopen")
    own = host.lower() in conn.ctx.backend.aliases(conn.user.name)
    allowed = own or conn.ctx.config.forward_allowed(host, port)
    refusal = (f"forwarding to {host}:{port} is not allowed; use localhost:{port} to reach "
               "your own container")
    if not allowed and not _is_address(host):
        raise _refuse(conn, host, port, refusal)

    async def connect() -> asyncssh.SSHForwarder:
        nonlocal own
        assert conn.conn is not None
        target = f"{host}:{port}"
        if not allowed:  # an address: hers (then as her own names), or refused
            try:
                state = await conn.ctx.ensure(conn.user)
            except GatewayError as exc:
                raise ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.user_message) from exc
            if state.ip != host:
                raise _refuse(conn, host, port, refusal)
            own = True
        if own:
            try:
                await conn.ctx.ensure(conn.user)
                sock = await conn.ctx.backend.open_connection(conn.user.name, port)
            except GatewayError as exc:
                raise ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.user_message) from exc
            target = "{}:{}".format(*sock.getpeername()[:2])
            # the same forwarder asyncssh's own forward_connection() makes, on our socket
            _, peer = await asyncio.get_running_loop().create_connection(SSHForwarder,
                                                                         sock=sock)
            forwarder = SSHForwarder(peer)
        else:
            forwarder = await conn.conn.forward_connection(host, port)
        log.info("[%s] forward: user=%s %s:%s -> %s", conn.tag, conn.user.name, host, port,
                 target)
        conn.ctx.events.emit("forward.open", conn=conn.id, user=conn.user.name, host=host,
                             port=port, target=target)
        conn.ctx.registry.activity.touch(conn.user.name)
        return forwarder

    return connect()


def direct_streamlocal(conn: ConnectionInfo, path: str) -> object:
    """`ssh -L local:/path/in/her/container.sock` (IDEs forward their server's socket): to a
    socket she owns in her own environment, nowhere else."""
    if not conn.key_allows("port-forwarding"):
        raise _refuse(conn, path, 0, "port forwarding is disabled for this key")

    async def connect() -> asyncssh.SSHForwarder:
        try:
            await conn.ctx.ensure(conn.user)
            sock = await conn.ctx.backend.open_unix(conn.user.name, path)
        except GatewayError as exc:
            raise _refuse(conn, path, 0, exc.user_message) from exc
        _, peer = await asyncio.get_running_loop().create_unix_connection(SSHForwarder,
                                                                          sock=sock)
        log.info("[%s] forward: user=%s unix %s", conn.tag, conn.user.name, path)
        conn.ctx.events.emit("forward.open", conn=conn.id, user=conn.user.name, host=path,
                             port=0, target=f"unix:{path}")
        conn.ctx.registry.activity.touch(conn.user.name)
        return SSHForwarder(peer)

    return connect()
