"""wire.py: over a real asyncssh connection on loopback, the gateway's side sends no empty
SSH_MSG_IGNORE before its packets when it encrypts with AES-GCM, chacha20-poly1305 or AES-CTR,
and still does with a CBC cipher; the bytes arrive intact either way.  Without wire.install
asyncssh sends one before every packet (the control: the test can fail).  What it buys
(CPU per GiB, throughput) is measured by the bench, not here."""

from __future__ import annotations

import asyncio
import hashlib

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE

from gateway.ssh import wire

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: ~32 channel data packets of 32 KiB


class Server(asyncssh.SSHServer):
    def __init__(self, sent: list[int], install: bool) -> None:
        self._sent = sent
        self._install = install

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        inner = conn.send_packet
        sent = self._sent

        def counted(pkttype: int, *args: bytes, handler: object = None) -> None:
            sent.append(pkttype)  # what passes wire's filter (and really leaves)
            inner(pkttype, *args, handler=handler)

        conn.send_packet = counted
        if self._install:
            wire.install(conn)

    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: this is about packets, not logins


async def _send_payload(process: asyncssh.SSHServerProcess) -> None:
    process.stdout.write(PAYLOAD)
    process.exit(0)


async def _transfer(cipher: str, install: bool) -> list[int]:
    sent: list[int] = []
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[key],
                                   server_factory=lambda: Server(sent, install),
                                   process_factory=_send_payload, encoding=None,
                                   encryption_algs=[cipher])
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u",
                                    encryption_algs=[cipher]) as conn:
            result = await conn.run("anything", encoding=None)
        assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(PAYLOAD).digest()
        assert result.exit_status == 0
    finally:
        server.close()
        await server.wait_closed()
    assert sent.count(MSG_CHANNEL_DATA) >= len(PAYLOAD) // 32768
    return sent


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                                    "chacha20-poly1305@openssh.com", "aes128-ctr"])
def test_no_ignore_packets_with_a_cipher_that_needs_none(cipher: str) -> None:
    sent = asyncio.run(_transfer(cipher, install=True))
    assert MSG_IGNORE not in sent


def test_cbc_keeps_its_countermeasure() -> None:
    sent = asyncio.run(_transfer("aes128-cbc", install=True))
    assert sent.count(MSG_IGNORE) >= sent.count(MSG_CHANNEL_DATA)


def test_asyncssh_sends_one_before_every_packet_without_it() -> None:
    """The control: what wire.py exists for is still what asyncssh does (if a release stops
    doing it, this fails and wire.py can go)."""
    sent = asyncio.run(_transfer("aes128-gcm@openssh.com", install=False))
    assert sent.count(MSG_IGNORE) >= sent.count(MSG_CHANNEL_DATA)
