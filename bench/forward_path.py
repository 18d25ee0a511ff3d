"""`ssh -L` data path into a container: the namespace socket (default) against dialling the
container's address (the path before, and the fallback), measured side by side in one run.

    python -m bench.forward_path [--connects 300] [--mib 512]

Both paths go through `DockerBackend.open_connection`; only how the socket is made differs
(`netns.available` forced off for the address path).  A sink/echo server runs in one test
user's container, bound to 0.0.0.0 so both paths can reach it.  Prints connect latency
(median, p95) and one-way throughput, and the ratio namespace / address.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path

from gateway.backend import Limits, ProcessSpec
from gateway.backend.docker import DockerBackend, DockerClient

SERVER = r"""
import socket, threading
def serve(c):
    mode = c.recv(1)
    if mode == b"e":          # echo one byte back: connect + round trip
        c.sendall(c.recv(1))
    else:                     # sink: count until EOF, then report
        n = 0
        while (d := c.recv(1 << 20)):
            n += len(d)
        c.sendall(str(n).encode())
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT)); s.listen(128); print("ready", flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


async def measure(backend: DockerBackend, user: str, port: int, netns: bool, connects: int,
                  mib: int) -> dict[str, float]:
    backend.netns.available = None if netns else False
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(connects):
        t0 = time.perf_counter()
        sock = await backend.open_connection(user, port)
        await loop.sock_sendall(sock, b"ex")
        await loop.sock_recv(sock, 1)
        times.append(time.perf_counter() - t0)
        sock.close()
    sock = await backend.open_connection(user, port)
    chunk = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    await loop.sock_sendall(sock, b"s")
    for _ in range(mib):
        await loop.sock_sendall(sock, chunk)
    sock.shutdown(1)
    got = int((await loop.sock_recv(sock, 64)).decode())
    elapsed = time.perf_counter() - t0
    sock.close()
    assert got == mib << 20, got
    times.sort()
    return {"p50_ms": statistics.median(times) * 1e3,
            "p95_ms": times[int(len(times) * 0.95) - 1] * 1e3,
            "mib_s": mib / elapsed}


async def main_async(args: argparse.Namespace) -> int:
    prefix = f"dgwfwd{secrets.token_hex(2)}"
    state = Path(f"/tmp/{prefix}")
    backend = DockerBackend(DockerClient(), image=args.image, prefix=prefix,
                            uids_file=state / "uids.json")
    user, port = "fwd", 47000
    try:
        await backend.ensure(user, Limits(cpus=2, memory=2 << 30, pids=500))
        code = SERVER.replace("PORT", str(port))
        server = await backend.start(ProcessSpec(user=user, kind="command",
                                                 command=f"python3 -u -c '{code}'"))
        stream, data = await server.read()
        assert b"ready" in data, data
        rows = []
        for rnd in range(args.rounds):  # interleaved so machine noise hits both
            for netns in (True, False):
                r = await measure(backend, user, port, netns, args.connects, args.mib)
                rows.append((rnd, "namespace" if netns else "address", r))
        print("| round | path | connect+echo p50 | p95 | throughput |")
        print("| --- | --- | ---: | ---: | ---: |")
        for rnd, name, r in rows:
            print(f"| {rnd} | {name} | {r['p50_ms']:.2f} ms | {r['p95_ms']:.2f} ms | "
                  f"{r['mib_s']:.0f} MiB/s |")

        def med(name: str, key: str) -> float:
            return statistics.median(r[key] for _, n, r in rows if n == name)

        print(f"\nratio namespace/address: connect p50 "
              f"{med('namespace', 'p50_ms') / med('address', 'p50_ms'):.2f}x, throughput "
              f"{med('namespace', 'mib_s') / med('address', 'mib_s'):.2f}x")
        server.close()
    finally:
        await backend.purge(user)
        await backend.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.forward_path", description=__doc__)
    p.add_argument("--connects", type=int, default=300)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image", default="dind-gateway/dind:latest")
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
