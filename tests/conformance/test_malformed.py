"""Malformed SSH traffic from a raw socket (random bytes after the version line, truncated
packets, absurd packet lengths) leaves the gateway serving, with its tables back to empty."""

from __future__ import annotations

import os
import resource
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..conftest import wait_for
from .conftest import InProcessGateway

PACKETS = st.one_of(
    st.binary(max_size=2000),  # noise
    st.builds(lambda n, body: struct.pack(">I", n) + body,  # a length that lies
              st.sampled_from([0, 1, 5, 35000, 2**24, 2**31 - 1, 2**32 - 1]),
              st.binary(max_size=64)),
    st.builds(lambda body, pad: struct.pack(">IB", len(body) + pad + 1, pad) + body,
              st.binary(max_size=300), st.integers(0, 255)),  # well framed, nonsense inside
)


def _send(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(2)
        s.sendall(b"SSH-2.0-fuzz_1.0\r\n" + data)
        s.shutdown(socket.SHUT_WR)  # EOF: the gateway must not wait on a length that lied
        try:
            while s.recv(65536):  # until the gateway hangs up or goes quiet
                pass
        except (TimeoutError, ConnectionError):
            pass


def test_malformed_packets_leave_the_gateway_serving(live: InProcessGateway) -> None:
    if live.kind != "fake":  # the SSH layer is the same for every backend: once is enough
        return
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(max_examples=int(os.environ.get("DGW_FUZZ_EXAMPLES", "80")), deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(packets=st.lists(PACKETS, min_size=1, max_size=4))
    def run(packets: list[bytes]) -> None:
        _send(live.port, b"".join(packets))

    run()
    assert wait_for(lambda: live.app.guard.unauthenticated == 0, 30), \
        live.app.guard.unauthenticated
    r = live.ssh("alice", "echo alive")
    assert r.returncode == 0 and r.stdout == b"alive\n", r.stderr
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown < 200 * 1024, f"peak RSS grew by {grown} KiB"  # no buffer of 4 GiB lengths
