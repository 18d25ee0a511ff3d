"""One SSH packet per message on the wire, not two: asyncssh's CBC countermeasure, kept for CBC.

asyncssh (every version since its first, 2013) sends an empty SSH_MSG_IGNORE before every
packet after the key exchange: the old countermeasure against the chosen-plaintext attack on
CBC mode's predictable IVs (the one OpenSSH once used).  The cipher modes this gateway offers
(AES-GCM by default; `ciphers:` can add chacha20-poly1305 or AES-CTR) are not open to that
attack - a fresh nonce or counter per packet - and for them the countermeasure is pure cost:
every 32 KiB of an sftp transfer becomes two packets, two AES-GCM calls, two `os.urandom`
calls and two transport writes.  Measured on an sftp get (docs/benchmarks.md): the packets
the gateway sends halve.

So each connection's `send_packet` is wrapped (on the connection object, not asyncssh's class)
to leave out exactly that packet - an empty MSG_IGNORE - unless the cipher it sends with is a
CBC one.  The gateway sends no empty MSG_IGNORE of its own; a client's keystroke-timing chaff
is traffic the other way and is not touched.
"""

from __future__ import annotations

from typing import Any

from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

_EMPTY = String(b"")


def install(conn: Any) -> None:
    """Wrap this connection's `send_packet` (see the module docstring)."""
    send_packet = conn.send_packet

    def without_cbc_chaff(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY,) and not sends_cbc(conn):
            return
        send_packet(pkttype, *args, handler=handler)

    conn.send_packet = without_cbc_chaff


def sends_cbc(conn: Any) -> bool:
    """The cipher this side encrypts with is a CBC one (or not known: keep the countermeasure)."""
    name = getattr(conn, "_enc_alg_sc" if conn.is_server() else "_enc_alg_cs", None)
    return not isinstance(name, bytes) or b"-cbc" in name
