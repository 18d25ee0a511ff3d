"""`python -m bench.gwtrace TRACEFILE serve --config …`: the gateway, with wall-clock spans.

For profiling only.  The gateway's code is not changed: a few methods are wrapped at import time
so that each Docker API call, each `ensure`, exec start and exit-status wait, and the
connection / auth / session milestones are written to TRACEFILE as JSON lines
{"t0": start, "t1": end, "what": ...} (perf_counter seconds).  bench/profile.py reads them.
$BENCH_LISTEN_OVERRIDES (JSON) is merged into the arguments of asyncssh.listen(), to try
listener settings (ciphers, window, packet size) on the unchanged gateway.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from typing import Any


def main() -> int:
    trace_path, argv = sys.argv[1], sys.argv[2:]
    out = open(trace_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def emit(what: str, t0: float, t1: float | None = None) -> None:
        out.write(json.dumps({"t0": t0, "t1": t1 if t1 is not None else t0, "what": what})
                  + "\n")

    import asyncssh

    # Experiments without editing the gateway: BENCH_LISTEN_OVERRIDES='{"max_pktsize": ...}'
    # is merged into the keyword arguments of the gateway's asyncssh.listen() call.
    overrides = json.loads(os.environ.get("BENCH_LISTEN_OVERRIDES") or "{}")
    if overrides:
        listen = asyncssh.listen

        async def listen_with_overrides(*args: Any, **kw: Any) -> Any:
            return await listen(*args, **{**kw, **overrides})

        asyncssh.listen = listen_with_overrides

    from gateway.backend.docker import backend, process
    from gateway.backend.docker import engine as dockerapi
    from gateway.ssh import server, session

    def span(cls: type, name: str, label: Any) -> None:
        orig = getattr(cls, name)

        @functools.wraps(orig)
        async def wrapper(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await orig(*args, **kw)
            finally:
                emit(label(*args, **kw) if callable(label) else label, t0, time.perf_counter())

        setattr(cls, name, wrapper)

    def point(cls: type, name: str, label: str) -> None:
        orig = getattr(cls, name)

        @functools.wraps(orig)
        def wrapper(*args: Any, **kw: Any) -> Any:
            emit(label, time.perf_counter())
            return orig(*args, **kw)

        setattr(cls, name, wrapper)

    ids = re.compile(r"/[0-9a-f]{64}|/(?=[^/]*-)[a-z0-9-]+(?=/)")

    def api_label(self: Any, method: str, url: str, body: Any = None) -> str:
        path = url.split("?", 1)[0].split("/", 2)[-1]
        return f"api {method} /{ids.sub('/{id}', '/' + path)[1:]}"

    span(dockerapi.DockerClient, "_call", api_label)
    span(dockerapi.DockerClient, "exec_start", "api POST /exec/{id}/start (hijack)")
    span(backend.DockerBackend, "ensure", "ensure")
    span(process.DockerProcess, "wait", "exit-status wait")
    span(session.GatewaySession, "_run", "session")
    point(server.Connection, "connection_made", "connection made")
    point(server.Connection, "auth_completed", "auth completed")
    point(session.GatewaySession, "session_started", "session started")
    point(session.GatewaySession, "connection_lost", "channel closed")

    from gateway.app import main as gateway_main

    return gateway_main(argv)


if __name__ == "__main__":
    sys.exit(main())
