"""Immediate TCP ACKs while a connection logs in: no 40 ms stalls in the handshake.

OpenSSH's client turns TCP_NODELAY on only once a session is interactive, so during the key
exchange and authentication it sends two messages back to back under Nagle's algorithm
(KEXINIT then KEX_ECDH_INIT; NEWKEYS then SERVICE_REQUEST): the second waits until the first
is acknowledged.  Linux delays that ACK when the receiver has nothing to send back at once
(its delayed-ACK timer, 40 ms), and here the gateway has nothing to send until it gets the
second message.  Measured with tcpdump on loopback: one or two such 40 ms stalls in every
login, ended by a bare ACK of the gateway's - most of a 65-110 ms warm login.

So for the first reads of a connection the gateway sets TCP_QUICKACK as each read arrives,
which sends a pending ACK at once; then it steps aside (the protocol it wraps is put back),
so a transfer pays no extra system call.  Nothing in the client is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

HANDSHAKE_READS = 32  # a login (kex, auth, a session's requests) is ~15 reads
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class QuickAck(asyncio.Protocol):
    """Stands between the transport and the connection for its first reads."""

    def __init__(self, transport: asyncio.Transport, protocol: Any, sock: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._sock = sock
        self._left = HANDSHAKE_READS

    def data_received(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # first: the ACK leaves before the work starts
            self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        self._left -= 1
        if self._left <= 0 and self._transport.get_protocol() is self:
            self._transport.set_protocol(self._protocol)
        self._protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self._protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


def install(transport: Any) -> None:
    """Wrap a new TCP connection's protocol (see the module docstring); no-op elsewhere."""
    # (uvloop's transports are not asyncio.Transport subclasses: asked for what is used)
    if _QUICKACK is None or not hasattr(transport, "set_protocol"):
        return
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    transport.set_protocol(QuickAck(transport, transport.get_protocol(), sock))
