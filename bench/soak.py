"""Soak run: is the gateway's memory and fd use flat under a long mixed workload?

    python -m bench.soak --minutes 15 [--workers 2] [--interval 10] [--json FILE]

Starts the real gateway (`bench.rig.Rig`, no baselines), then loops for N minutes, each
worker repeating one iteration:

- a fresh asyncssh login running two exec commands (`echo`, `cat /etc/hostname`);
- an sftp put and get of a small random file (compared byte for byte);
- an `ssh -L` round trip: asyncssh's local port forward to an echo server in the user's
  container (started once over a long-lived session), a few bytes sent and read back;
- an OpenSSH `ssh … true` login (the other client stack).

Every ~interval seconds the workers are paused between iterations (so nothing is in flight
but the echo server's session) and the gateway process's VmRSS and open fd count are
sampled.  After the warm-up (the first 20 % of the run) the first warm sample is compared
with the last one and with the maximum; "flat" means both stay within 10 % of the first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncssh

from .measure import rss_of
from .rig import BenchError, Rig, report_failure

USER = "soak"
ECHO_PORT = 47123
ECHO_SERVER = f"""
import socket, threading
def serve(c):
    while (d := c.recv(65536)):
        c.sendall(d)
    c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", {ECHO_PORT})); s.listen(128); print("ready", flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
TOLERANCE = 0.10
WARMUP = 0.20


def say(text: str) -> None:
    """One progress line on stdout."""
    print(f"soak: {text}", flush=True)


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds of a process by kind (socket, pipe, anon_inode:[eventpoll], /path…)."""
    out: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":[")[0] if target.startswith(("socket:", "pipe:")) else target
        out[kind] = out.get(kind, 0) + 1
    return out


def children_of(pid: int) -> dict[str, int]:
    """The direct children of a process, counted by command name."""
    out: dict[str, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            head, rest = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        if int(rest.split()[1]) == pid:
            comm = head.split("(", 1)[1]
            out[comm] = out.get(comm, 0) + 1
    return out


@dataclass
class Sample:
    """One reading of the gateway process."""

    t: float  # seconds since the loop started
    iterations: int
    rss: int  # bytes
    fds: int
    kinds: dict[str, int] = field(default_factory=dict)
    children: dict[str, int] = field(default_factory=dict)  # comm -> count, direct children


@dataclass
class Soak:
    """State shared by the workers and the sampler."""

    rig: Rig
    port: int
    key: Path
    data: bytes = field(default_factory=lambda: secrets.token_bytes(16 * 1024))
    iterations: int = 0
    errors: list[str] = field(default_factory=list)
    running: asyncio.Event = field(default_factory=asyncio.Event)
    idle: int = 0  # workers parked at the barrier
    samples: list[Sample] = field(default_factory=list)

    async def connect(self, timeout: float = 60) -> asyncssh.SSHClientConnection:
        """A fresh asyncssh login as the soak user."""
        return await asyncio.wait_for(asyncssh.connect(
            "127.0.0.1", self.port, username=USER, client_keys=[str(self.key)],
            known_hosts=None, agent_path=None), timeout)

    async def iteration(self, worker: int) -> None:
        """Login + exec, sftp put/get, -L round trip, OpenSSH login."""
        async with await self.connect() as conn:
            r = await conn.run("echo ok", check=True, timeout=60)
            if r.stdout != "ok\n":
                raise BenchError(f"echo: got {r.stdout!r}")
            await conn.run("cat /etc/hostname", check=True, timeout=60)
            local = self.rig.tmp / f"put-{worker}"
            back = self.rig.tmp / f"get-{worker}"
            local.write_bytes(self.data)
            async with conn.start_sftp_client() as sftp:
                await sftp.put(str(local), f"soak-{worker}.bin")
                await sftp.get(f"soak-{worker}.bin", str(back))
            if back.read_bytes() != self.data:
                raise BenchError("sftp: file came back different")
            listener = await conn.forward_local_port("127.0.0.1", 0, "localhost", ECHO_PORT)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1",
                                                               listener.get_port())
                msg = secrets.token_bytes(4096)
                writer.write(msg)
                await writer.drain()
                got = await asyncio.wait_for(reader.readexactly(len(msg)), 30)
                writer.close()
                await writer.wait_closed()
                if got != msg:
                    raise BenchError("-L echo: bytes came back different")
            finally:
                listener.close()
                await listener.wait_closed()
        ssh = await asyncio.create_subprocess_exec(
            *self.rig.contenders["gateway"].ssh(USER, "true"), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(ssh.communicate(), 60)
        if ssh.returncode != 0:
            raise BenchError(f"OpenSSH login: exit {ssh.returncode}: {err.decode()[-300:]}")

    async def worker(self, n: int, deadline: float) -> None:
        """Iterate until the deadline, parking at the barrier while the sampler reads."""
        try:
            await self._work(n, deadline)
        finally:
            self.parked.set()

    async def _work(self, n: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.running.is_set():
                self.idle += 1
                self.parked.set()
                await self.running.wait()
                self.idle -= 1
                continue
            try:
                await self.iteration(n)
                self.iterations += 1
            except (OSError, asyncssh.Error, TimeoutError, BenchError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                say(f"worker {n}: iteration failed: {type(exc).__name__}: {exc}")
                if len(self.errors) > 20:
                    raise BenchError("more than 20 failed iterations") from exc
                await asyncio.sleep(1)

    async def sample(self, t0: float, workers: int) -> Sample:
        """Pause the workers between iterations, let the gateway settle, read it."""
        self.running.clear()
        while self.idle + sum(t.done() for t in self.tasks) < workers:
            self.parked.clear()
            await self.parked.wait()
        await asyncio.sleep(1.0)  # closes the gateway sees after the client is gone
        pid = self.rig.gateway_pid()
        s = Sample(round(time.monotonic() - t0, 1), self.iterations, rss_of(pid), fd_count(pid),
                   fd_kinds(pid), children_of(pid))
        self.samples.append(s)
        self.running.set()
        return s

    tasks: list[asyncio.Task] = field(default_factory=list)
    parked: asyncio.Event = field(default_factory=asyncio.Event)  # a worker parked or ended


def slope(xs: list[float], ys: list[int]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def summarise(samples: list[Sample], minutes: float) -> dict[str, object]:
    """First warm sample vs last and max, for RSS and fds; the verdict."""
    warm_from = minutes * 60 * WARMUP
    warm = [s for s in samples if s.t >= warm_from] or samples[-1:]
    out: dict[str, object] = {"warmup_s": warm_from, "warm_samples": len(warm)}
    ok = True
    for key in ("rss", "fds"):
        vals = [getattr(s, key) for s in warm]
        first, last, top = vals[0], vals[-1], max(vals)
        growth_last = (last - first) / first if first else 0.0
        growth_max = (top - first) / first if first else 0.0
        flat = growth_last <= TOLERANCE and growth_max <= TOLERANCE
        ok = ok and flat
        out[key] = {"first": first, "last": last, "max": top, "min": min(vals),
                    "growth_last": growth_last, "growth_max": growth_max, "flat": flat,
                    "slope_per_hour": slope([s.t for s in warm], vals) * 3600}
    out["pass"] = ok
    return out


def table(summary: dict[str, object], iterations: int, errors: int) -> str:
    """The report as a markdown table plus the verdict line."""
    rows = ["| metric | first warm | last | min | max | last vs first | max vs first "
            "| trend (least squares) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, name, scale, unit in (("rss", "gateway VmRSS", 1 << 20, " MiB"),
                                   ("fds", "gateway open fds", 1, "")):
        m = summary[key]
        assert isinstance(m, dict)

        def fmt(v: int, scale: int = scale, unit: str = unit) -> str:
            return f"{v / scale:.1f}{unit}" if scale > 1 else f"{v}"

        trend = (f"{m['slope_per_hour'] / scale:+.2f}{unit}/h" if scale > 1
                 else f"{m['slope_per_hour']:+.1f}/h")
        rows.append(f"| {name} | {fmt(m['first'])} | {fmt(m['last'])} | {fmt(m['min'])} | "
                    f"{fmt(m['max'])} | {m['growth_last']:+.1%} | {m['growth_max']:+.1%} | "
                    f"{trend} |")
    verdict = "PASS" if summary["pass"] else "FAIL"
    rows.append("")
    rows.append(f"{verdict}: RSS and fd count flat within {TOLERANCE:.0%} after the "
                f"{summary['warmup_s']:.0f} s warm-up ({iterations} iterations, "
                f"{errors} failed)")
    return "\n".join(rows)


async def soak(rig: Rig, minutes: float, workers: int, interval: float) -> Soak:
    """Run the loop for `minutes`; the filled-in Soak."""
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    c = rig.contenders["gateway"]
    st = Soak(rig, c.port, c.keys[USER])
    say("first login (starts the container) …")
    server_conn = await st.connect(timeout=600)
    server = await server_conn.create_process(f"exec python3 -u -c '{ECHO_SERVER}'")
    line = await asyncio.wait_for(server.stdout.readline(), 120)
    if "ready" not in line:
        raise BenchError(f"echo server did not start: {line!r}")
    st.running.set()
    t0 = time.monotonic()
    deadline = t0 + minutes * 60
    st.tasks = [asyncio.create_task(st.worker(i, deadline)) for i in range(workers)]
    s = await st.sample(t0, workers)
    say(f"t={s.t:6.0f}s iterations={s.iterations:5d} rss={s.rss / (1 << 20):6.1f} MiB "
        f"fds={s.fds}")
    try:
        while time.monotonic() < deadline:
            await asyncio.wait(st.tasks, timeout=max(0.0, min(interval,
                                                             deadline - time.monotonic())))
            for t in st.tasks:
                if t.done() and t.exception():
                    raise t.exception()
            s = await st.sample(t0, workers)
            say(f"t={s.t:6.0f}s iterations={s.iterations:5d} "
                f"rss={s.rss / (1 << 20):6.1f} MiB fds={s.fds}")
        await asyncio.gather(*st.tasks)
    finally:
        for t in st.tasks:
            t.cancel()
        server.close()
        server_conn.close()
        with contextlib.suppress(Exception):
            await server_conn.wait_closed()
    return st


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Command line entry: set up, soak, tear down, report."""
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15, help="length of the loop")
    p.add_argument("--workers", type=int, default=2, help="iterations running at once")
    p.add_argument("--interval", type=float, default=10, help="seconds between samples")
    p.add_argument("--image", default="dind-gateway/dind:latest")
    p.add_argument("--profile", default="hardened", choices=["hardened", "rootless"])
    p.add_argument("--json", type=Path, help="write samples and summary here")
    p.add_argument("--summarise", type=Path, metavar="JSON",
                   help="no run: print the table again for an earlier run's --json file")
    args = p.parse_args(argv)
    if args.summarise:
        old = json.loads(args.summarise.read_text())
        samples = [Sample(**s) for s in old["samples"]]
        summary = summarise(samples, old["minutes"])
        print(table(summary, old["iterations"], len(old["errors"])))
        return 0 if summary["pass"] else 2
    signal.signal(signal.SIGTERM, _interrupt)
    rig = Rig(image=args.image, users=[USER], security_profile=args.profile)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    status = 0
    st = None
    try:
        rig.start(baselines=False)
        say(f"gateway pid {rig.gateway_pid()} on :{rig.contenders['gateway'].port}, "
            f"prefix {rig.prefix}; {args.minutes:g} min, {args.workers} workers")
        st = asyncio.run(soak(rig, args.minutes, args.workers, args.interval))
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        status = 130
    except Exception as exc:  # noqa: BLE001 - report, clean up
        status = report_failure("bench soak", exc,
                                {"gateway": rig.tmp / "gateway" / "gateway.log"})
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("cleaning up")
        rig.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if st is None or len(st.samples) < 2:
        return status or 1
    summary = summarise(st.samples, args.minutes)
    print(table(summary, st.iterations, len(st.errors)), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "started": started, "minutes": args.minutes, "workers": args.workers,
            "iterations": st.iterations, "errors": st.errors, "summary": summary,
            "samples": [asdict(s) for s in st.samples]}, indent=1))
        say(f"wrote {args.json}")
    if status == 0 and not summary["pass"]:
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
