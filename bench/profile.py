"""`python -m bench.profile`: where the gateway spends its time on the warm-login and stream paths.

Sets up the bench rig with the gateway started through bench.gwtrace (wall-clock spans of Docker
API calls and session milestones) and samples it with py-spy (`pip install py-spy`):

1. N sequential warm logins (`ssh … true`): the median of each phase, the Docker API calls per
   login, and the gateway's CPU profile;
2. one stream each way (default client ciphers): CPU profile and throughput;
3. interleaved variants: client ciphers, a second gateway on the stock asyncio loop
   (--no-uvloop), the DIY baseline, and the key exchange's share of a warm login.

Prints a report; nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .measure import run, say, shell
from .report import MIB
from .rig import BenchError, Contender, Rig

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class Spy:
    """py-spy record on a PID, in raw (folded) format, stopped with SIGINT."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["py-spy", "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "-o", str(out),
             "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        elapsed = time.perf_counter() - self.t0
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return elapsed


def _short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
    return f"{m.group('func')} ({f})"


def top_functions(folded: Path, n: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """(samples, [(function, self samples, inclusive samples)]) by inclusive then self."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_short(f) for f in stack.split(";") if not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += c
        self_c[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    rows = [(f, self_c[f], incl[f]) for f in set(self_c) | set(incl)]
    by_self = sorted(rows, key=lambda r: -r[1])[:n]
    return total, by_self


def print_profile(title: str, folded: Path, seconds: float, rate: int) -> None:
    total, rows = top_functions(folded)
    print(f"\n### {title}\n")
    print(f"{total} samples in {seconds:.1f} s at {rate} Hz: gateway busy "
          f"{total / rate / seconds * 100:.0f}% of one core\n")
    print("| self % | incl % | function |")
    print("| ---: | ---: | --- |")
    for f, s, i in rows:
        print(f"| {s / total * 100:.1f} | {i / total * 100:.1f} | `{f}` |")


def trace_events(path: Path, since: float) -> list[dict]:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((e for e in events if e["t0"] >= since), key=lambda e: e["t0"])


def warm_breakdown(events: list[dict]) -> None:
    """Split the trace into logins at each `connection made` and report median phases."""
    logins: list[list[dict]] = []
    for e in events:
        if e["what"] == "connection made":
            logins.append([])
        if logins:
            logins[-1].append(e)
    phases: dict[str, list[float]] = collections.defaultdict(list)
    api_counts: list[int] = []
    api_kinds: collections.Counter[str] = collections.Counter()
    for evs in logins:
        first = {}
        for e in evs:
            first.setdefault(e["what"], e)
        need = ("connection made", "auth completed", "session started", "session",
                "channel closed")
        if not all(k in first for k in need):
            continue
        c0 = first["connection made"]["t0"]
        phases["TCP accept → auth completed (kex + user auth)"].append(
            first["auth completed"]["t0"] - c0)
        phases["auth completed → session started (channel open + exec request)"].append(
            first["session started"]["t0"] - first["auth completed"]["t0"])
        for what in ("ensure", "exit-status wait"):
            if what in first:
                phases[f"{what} (span)"].append(first[what]["t1"] - first[what]["t0"])
        sess = first["session"]
        phases["session started → session end (_run)"].append(sess["t1"] - sess["t0"])
        phases["session end → channel closed"].append(first["channel closed"]["t0"] - sess["t1"])
        phases["TCP accept → channel closed (server side total)"].append(
            first["channel closed"]["t0"] - c0)
        apis = [e for e in evs if e["what"].startswith("api ")]
        api_counts.append(len([e for e in apis if "(hijack)" not in e["what"]]))
        for e in apis:
            api_kinds[e["what"]] += 1
            phases[e["what"]].append(e["t1"] - e["t0"])
    n = len(api_counts)
    print(f"\n### Warm login, server side ({n} logins traced)\n")
    print("| phase | median ms | max ms |")
    print("| --- | ---: | ---: |")
    for k, v in phases.items():
        print(f"| {k} | {statistics.median(v) * 1000:.1f} | {max(v) * 1000:.1f} |")
    if n:
        print(f"\nDocker API requests per warm login: median {statistics.median(api_counts)}"
              f" ({', '.join(f'{k} ×{v / n:.1f}' for k, v in api_kinds.most_common())})")


def stream(rig: Rig, direction: str, size: int, opts: tuple[str, ...] = (),
           c: Contender | None = None) -> float:
    c, user = c or rig.contenders["gateway"], rig.users[0]
    if direction == "up":
        cmd = f"head -c {size} /dev/zero | {shlex.join(c.ssh(user, 'wc -c', opts=opts))}"
    else:
        cmd = f"{shlex.join(c.ssh(user, f'head -c {size} /dev/zero', opts=opts))} | wc -c"
    return size / MIB / run(shell(cmd), f"stream {direction}", expect=str(size).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--logins", type=int, default=40)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the variants")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--image", default="dind-gateway/dind:latest")
    p.add_argument("--gateway-rev", metavar="REV", help="profile the gateway of this commit")
    p.add_argument("--keep", type=Path, help="copy py-spy's folded stacks and the trace here")
    args = p.parse_args(argv)
    if not shutil.which("py-spy"):
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    rig = Rig(image=args.image, users=["u01"])
    trace = rig.tmp / "trace.jsonl"
    rig.gateway_cmd = [sys.executable, "-m", "bench.gwtrace", str(trace)]
    user = "u01"
    try:
        if args.gateway_rev:
            say(f"gateway from commit {rig.use_gateway_rev(args.gateway_rev)[:12]}")
        rig.start()
        gw = rig.contenders["gateway"]
        rig.add_gateway("gateway-asyncio", ["--no-uvloop"], [sys.executable, "-m", "gateway"])
        gcm_only = json.dumps({"encryption_algs": ["aes128-gcm@openssh.com",
                                                   "aes256-gcm@openssh.com"]})
        big = json.dumps({"max_pktsize": 256 * 1024, "window": 8 * MIB})
        for name, env in (("gateway-gcm-only", gcm_only), ("gateway-bigpkt", big)):
            rig.add_gateway(name, [], [sys.executable, "-m", "bench.gwtrace",
                                       str(rig.tmp / f"trace-{name}.jsonl")],
                            {"BENCH_LISTEN_OVERRIDES": env})
        run(gw.ssh(user, "true"), "first login", timeout=600)
        rig.start_diy(user)
        rig.wait_ready(rig.diy_container(user))
        for c in rig.contenders.values():
            run(c.ssh(user, "true"), "warm-up")
        pid = rig.gateway_pid()

        say(f"{args.logins} warm logins under py-spy")
        since = time.perf_counter()
        spy = Spy(pid, rig.tmp / "warm.txt", args.rate)
        times = [run(gw.ssh(user, "true"), "warm login") for _ in range(args.logins)]
        secs = spy.stop()
        print("\n## Gateway profile\n")
        print(f"Warm login `ssh … true`, client side: median "
              f"{statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms")
        warm_breakdown(trace_events(trace, since))
        print_profile("Warm logins: gateway CPU", rig.tmp / "warm.txt", secs, args.rate)
        for direction in ("up", "down"):
            say(f"stream {direction} under py-spy")
            spy = Spy(pid, rig.tmp / f"{direction}.txt", args.rate)
            thr = stream(rig, direction, size)
            secs = spy.stop()
            print_profile(f"Stream {direction} {args.size_mib} MiB (default client cipher): "
                          f"{thr:.0f} MiB/s under py-spy", rig.tmp / f"{direction}.txt", secs,
                          args.rate)

        say(f"stream variants, {args.rounds} interleaved rounds")
        gcm = ("-c", "aes128-gcm@openssh.com")  # the gateway offers only GCM by default now
        variants = [("gateway (uvloop), default client ciphers", "gateway", ()),
                    ("gateway (uvloop), -c aes128-gcm@openssh.com", "gateway", gcm),
                    ("gateway offering only aes*-gcm, default client", "gateway-gcm-only", ()),
                    ("gateway max_pktsize 256 KiB + window 8 MiB, default client",
                     "gateway-bigpkt", ()),
                    ("gateway --no-uvloop, default client ciphers", "gateway-asyncio", ()),
                    ("diy, default client ciphers", "diy", ()),
                    ("diy, -c aes128-gcm@openssh.com", "diy", gcm)]
        thr: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for _ in range(args.rounds):
            for label, name, opts in variants:
                for direction in ("up", "down"):
                    thr[label, direction].append(
                        stream(rig, direction, size, opts, rig.contenders[name]))
        print(f"\n### Stream variants ({args.size_mib} MiB, median of {args.rounds} "
              "interleaved rounds, MiB/s)\n")
        print("| variant | up | down |")
        print("| --- | ---: | ---: |")
        for label, _, _ in variants:
            print(f"| {label} | {statistics.median(thr[label, 'up']):.0f} | "
                  f"{statistics.median(thr[label, 'down']):.0f} |")

        say("login variants, 15 interleaved rounds")
        curve = ("-o", "KexAlgorithms=curve25519-sha256")
        logins = [(f"{n}, {k}", n, o) for n in ("gateway", "gateway-gcm-only", "diy", "plain")
                  for k, o in (("default kex", ()), ("curve25519-sha256", curve))]
        lt: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(15):
            for label, name, opts in logins:
                lt[label].append(run(rig.contenders[name].ssh(user, "true", opts=opts), label))
        print("\n### Warm login variants (median of 15 interleaved rounds)\n")
        print("| contender, client kex | median ms | min ms |")
        print("| --- | ---: | ---: |")
        for label, _, _ in logins:
            print(f"| {label} | {statistics.median(lt[label]) * 1000:.0f} | "
                  f"{min(lt[label]) * 1000:.0f} |")
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for f in ("warm.txt", "up.txt", "down.txt", "trace.jsonl"):
                shutil.copy(rig.tmp / f, args.keep / f)
        return 0
    except BenchError as exc:
        print(f"profile: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        rig.close()


if __name__ == "__main__":
    sys.exit(main())
