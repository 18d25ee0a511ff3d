"""`python -m bench noisy` (or `python -m bench.noisy`): bob's warm login while alice abuses hers.

Starts the real gateway (bench/rig.py, no baselines) with two capped users, alice and bob, logs
both in once, then times bob's warm `ssh bob@gw true` with the OpenSSH client while alice, in
her own ssh session, runs one abuse after another at her caps: a CPU burn on every core, a
fork bomb against her pids cap, a memory hog at her memory cap, `dd` to her disk quota, and an
inner `docker run` / `docker build` loop.

For each abuse the N quiet and N noisy samples are taken in alternating blocks (quiet, noisy,
quiet, noisy, …) so that drift on the machine hits both.  Each abuse is bounded twice: by a
`timeout -s KILL` around its whole process group, and by a watchdog in the same group that
kills the group when the bench closes the session's stdin (a shell builtin, so it works even
at the pids cap, when nothing new can be started in her container).  Every abuse prints `go`
once it is at its cap; only then are noisy samples taken.

Prints a markdown table (p50/p95 quiet and noisy, ratios, met / not met against 1.5×) plus
host CPU figures per phase; writes nothing into the repository.  Timing targets are never
asserted anywhere else (tests/test_bench_quick.py only checks that this runs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import queue
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import parse_size

from .measure import run, say
from .report import MIB, machine, percentile
from .rig import (
    BenchError,
    Contender,
    Rig,
    _pid_of,
    docker,
    remove_labelled,
    report_failure,
    unmount_under,
)

TARGET = 1.5  # bob's latency during abuse, as a multiple of quiet
MARKER = "dgwnoisy-abuse"  # in the command line of the abuse processes (for the last resort)
PREFIX = "dgwnoisy"
DEFAULT_IMAGE = "dind-gateway/dind:latest"
# An inner image with just dash and cat, from files already in her container (no registry);
# the same trick as tests/test_isolation.py.
PROBE_IMAGE = ("cd / && tar -ch usr/bin/dash usr/bin/cat $(ldd /usr/bin/dash /usr/bin/cat | "
               "grep -o '/[^ ]*' | sed 's,^/,,' | sort -u) 2>/dev/null | docker import - probe "
               ">/dev/null && docker image inspect probe >/dev/null")
FILL = "noisy-fill.bin"


@dataclass(frozen=True)
class Abuse:
    key: str
    title: str
    body: str  # a sh script; prints "go" (and maybe a detail) once it is at its cap


def abuses(cores: int, memory: int, disk: int, bound: int) -> list[Abuse]:
    """The five abuses; each loops until killed (or its `bound` ends)."""
    hog = int(memory * 1.5)
    fork = ("import os, time\n"
            f"end = time.monotonic() + {bound}\n"
            "n = 0\n"
            "hit = False\n"
            "while time.monotonic() < end:\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError as e:\n"
            "        if not hit:\n"
            "            print('go', n, 'forks, then errno', e.errno, flush=True)\n"
            "            hit = True\n"
            "        continue\n"
            "    if pid == 0:\n"
            "        time.sleep(max(0.0, end - time.monotonic()))\n"
            "        os._exit(0)\n"
            "    n += 1\n"
            f"# {MARKER}\n")
    mem = f"b = b'x' * {hog}  # {MARKER}"
    return [
        Abuse("cpu", f"CPU burn: {2 * cores} busy loops (`while :; do :; done`)",
              f"for i in $(seq {2 * cores}); do sh -c ': {MARKER}; while :; do :; done' & done; "
              "echo go; wait"),
        Abuse("forkbomb", "fork bomb: python `os.fork()` until EAGAIN at her pids cap, and "
              "retrying while the children sleep",
              f"exec python3 -c {shlex.quote(fork)}"),
        Abuse("memory", f"memory hog: `b'x' * {hog // MIB} MiB` (1.5× her cap) in a loop, "
              "OOM-killed at her cap each time",
              "i=0; while :; do "
              f"python3 -c {shlex.quote(mem)} 2>/dev/null; rc=$?; i=$((i+1)); "
              '[ $i = 1 ] && echo "go (exit $rc)"; done'),
        Abuse("disk", f"disk fill: `dd` of {2 * disk // MIB} MiB into her {disk // MIB} MiB "
              "quota (`conv=fsync`), delete, repeat",
              "i=0; while :; do "
              f"out=$(dd if=/dev/zero of=$HOME/{FILL} bs=1M count={2 * disk // MIB} "
              "conv=fsync 2>&1); i=$((i+1)); "
              '[ $i = 1 ] && echo "go ($(echo "$out" | grep -o "No space left on device" '
              '|| echo "no ENOSPC"))"; '
              f"rm -f $HOME/{FILL}; done"),
        Abuse("docker", "inner Docker: `docker run --rm` of a busy loop + `docker build "
              "--no-cache`, in a loop",
              "i=0; while :; do "
              "docker run --rm probe /usr/bin/dash -c "
              "'i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done' || exit 1; "
              "printf 'FROM probe\\nRUN [\"/usr/bin/dash\", \"-c\", \"echo built\"]\\n' | "
              "DOCKER_BUILDKIT=0 docker build -q --no-cache -t noisy-build - >/dev/null "
              "|| exit 1; "
              'i=$((i+1)); [ $i = 1 ] && echo go; done'),
    ]


def wrap(abuse: Abuse, bound: int) -> str:
    """The remote command: the abuse in its own process group with two ways out.

    `timeout` makes itself a process-group leader and SIGKILLs the whole group after `bound`
    seconds.  Inside, a watchdog blocked on the session's stdin kills the group (builtin
    `kill`, no fork needed; dash takes `kill -KILL -PGID`, not `-- -PGID`) as soon as the
    bench closes that stdin.
    """
    inner = ("pg=$(ps -o pgid= -p $$ | tr -d ' '); exec 3<&0; "
             '(cat <&3 >/dev/null; kill -KILL -"$pg") & exec 3<&-; '
             f": {MARKER}; {abuse.body}")
    return f"exec timeout -s KILL {bound} sh -c {shlex.quote(inner)}"


# Bob's cleanup check, as alice: nothing of the abuse left, no fill file, no inner containers.
CLEANUP = (f"pkill -KILL -f '[{MARKER[0]}]{MARKER[1:]}'; rm -f $HOME/{FILL}; "
           "ids=$(docker ps -aq); [ -z \"$ids\" ] || docker rm -f $ids >/dev/null; "
           f"n=$(pgrep -f '[{MARKER[0]}]{MARKER[1:]}' | wc -l); echo left=$n")


class Session:
    """Alice's abuse session: the ssh client, its stdin held open, stdout read by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def wait_go(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"abuse not under way after {timeout:.0f} s: {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BenchError(f"abuse session ended before `go` (exit {self.proc.wait()}): "
                                 f"{self.seen} {err.strip()[-500:]}")
            self.seen.append(line)
            if line.startswith("go"):
                return line

    def stop(self, timeout: float = 30) -> int | None:
        """Close stdin (the watchdog kills the group); the client's exit code, None if killed."""
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


CLK = os.sysconf("SC_CLK_TCK")
FIELDS = ("wall", "busy", "iowait", "alice", "bob", "containers", "kthreads", "gateway",
          "disk_write", "loop_write")


def _cg_seconds(cid: str) -> float:
    """CPU seconds a container's cgroup has used; cid "" = all containers (cgroup v1 only)."""
    v1 = Path("/sys/fs/cgroup/cpuacct/docker", cid, "cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) * 1e-9
    v2 = Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat")
    if cid and v2.exists():
        return int(v2.read_text().split("\n", 1)[0].split()[1]) * 1e-6
    return float("nan")


def _kthread_ticks() -> dict[int, int]:
    """CPU ticks so far of each live kernel thread (kthreadd, pid 2, and its children)."""
    ticks = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f[1] == "2" or d == "2":
            ticks[int(d)] = int(f[11]) + int(f[12])
    return ticks


def _kthread_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    """What the kernel threads used in between (threads that came and went are missed)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK


def _sectors_written() -> tuple[int, int]:
    """512-byte sectors written: (whole physical disks, loop devices), from /proc/diskstats."""
    disks = loops = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        name = f[2]
        if name.startswith("loop"):
            loops += int(f[9])
        elif (not name.startswith(("ram", "dm-", "zram", "sr"))
              and os.path.exists(f"/sys/block/{name}")):
            disks += int(f[9])
    return disks, loops


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / CLK


def snapshot(rig: Rig, ids: dict[str, str]) -> dict[str, float]:
    """Counters whose differences say where the host's time went during a block."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    disk, loop = _sectors_written()
    return {"wall": time.perf_counter(), "busy": (sum(f[:8]) - f[3] - f[4]) / CLK,
            "iowait": f[4] / CLK, "alice": _cg_seconds(ids["alice"]),
            "bob": _cg_seconds(ids["bob"]), "containers": _cg_seconds(""),
            "kthreads": 0.0, "gateway": proc_cpu(rig.gateway_pid()),
            "disk_write": disk * 512 / MIB, "loop_write": loop * 512 / MIB}


@dataclass
class Phase:
    """Bob's samples in one condition (quiet or one abuse), with what the host did meanwhile."""

    times: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    use: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0.0))

    @property
    def p50(self) -> float:
        return percentile(self.times, 50)

    @property
    def p95(self) -> float:
        return percentile(self.times, 95)

    def per_second(self, key: str) -> float:
        """CPU seconds per second (cores busy) or MiB/s over the phase's blocks."""
        wall = self.use["wall"]
        return self.use[key] / wall if wall else float("nan")


@dataclass
class Outcome:
    abuse: Abuse
    quiet: Phase = field(default_factory=Phase)
    noisy: Phase = field(default_factory=Phase)
    notes: list[str] = field(default_factory=list)


def sample_block(rig: Rig, ids: dict[str, str], n: int, phase: Phase) -> None:
    bob = rig.contenders["gateway"]
    before, kt0 = snapshot(rig, ids), _kthread_ticks()
    for _ in range(n):
        try:
            phase.times.append(run(bob.ssh("bob", "true"), "bob's login", timeout=60))
        except BenchError as exc:
            phase.failures.append(str(exc)[:200])
    after = snapshot(rig, ids)
    after["kthreads"] = _kthread_seconds(kt0, _kthread_ticks())
    for k in FIELDS:
        phase.use[k] += after[k] - before[k]


def blocks(n: int, rounds: int) -> list[int]:
    """n samples split into `rounds` blocks as evenly as possible (no empty block)."""
    rounds = max(1, min(rounds, n))
    return [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]


def cleanup(gw: Contender, timeout: float = 60) -> None:
    """Until nothing of the abuse is left in alice's container."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        p = subprocess.run(gw.ssh("alice", CLEANUP), capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        last = (p.stdout + p.stderr).strip()
        if p.returncode == 0 and p.stdout.strip().endswith("left=0"):
            return
        time.sleep(1)
    raise BenchError(f"alice's abuse processes did not go away: {last[-300:]}")


def measure_abuse(rig: Rig, ids: dict[str, str], abuse: Abuse,
                  args: argparse.Namespace) -> Outcome:
    gw = rig.contenders["gateway"]
    out = Outcome(abuse)
    for i, n in enumerate(blocks(args.samples, args.rounds)):
        sample_block(rig, ids, n, out.quiet)
        session = Session(gw.ssh("alice", wrap(abuse, args.bound)))
        try:
            go = session.wait_go(args.ramp_timeout)
            if i == 0:
                out.notes.append(go)
            time.sleep(args.settle)
            sample_block(rig, ids, n, out.noisy)
        finally:
            code = session.stop()
            cleanup(gw)
        if code is None:
            out.notes.append(f"round {i + 1}: the abuse session had to be killed client-side")
        time.sleep(args.settle)
    return out


def fmt_ratio(v: float) -> str:
    return f"{v:.2f}×"


def verdict(ratio: float, failures: int) -> str:
    return "met" if failures == 0 and ratio <= TARGET else "**not met**"


def table(outcomes: list[Outcome]) -> str:
    lines = ["| abuse (alice) | n | quiet p50 | quiet p95 | noisy p50 | noisy p95 | ratio p50 "
             "| ratio p95 | bob failures | p50 ≤ 1.5× | p95 ≤ 1.5× |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for o in outcomes:
        q, z = o.quiet, o.noisy
        r50, r95 = z.p50 / q.p50, z.p95 / q.p95
        fails = len(z.failures)
        lines.append(f"| {o.abuse.key} | {len(q.times)}+{len(z.times)} | {q.p50:.3f} s | "
                     f"{q.p95:.3f} s | {z.p50:.3f} s | {z.p95:.3f} s | {fmt_ratio(r50)} | "
                     f"{fmt_ratio(r95)} | {fails} | {verdict(r50, fails)} | "
                     f"{verdict(r95, fails)} |")
    return "\n".join(lines)


def host_table(outcomes: list[Outcome]) -> str:
    """Where the host's two cores (and its disk) went while bob logged in."""
    lines = ["| abuse | phase | host CPU busy | iowait | alice's container | bob's container "
             "| all other containers | kernel threads | gateway | disk writes (loop) "
             "| what alice's abuse printed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for o in outcomes:
        for name, ph in (("quiet", o.quiet), ("noisy", o.noisy)):
            c = {k: ph.per_second(k) for k in FIELDS if k != "wall"}
            others_ = c["containers"] - c["alice"] - c["bob"]
            lines.append(
                f"| {o.abuse.key} | {name} | {c['busy']:.2f} cores | {c['iowait']:.2f} | "
                f"{c['alice']:.2f} | {c['bob']:.2f} | {others_:.2f} | {c['kthreads']:.2f} | "
                f"{c['gateway']:.2f} | {c['disk_write']:.0f} ({c['loop_write']:.0f}) MiB/s | "
                f"{'; '.join(o.notes) if name == 'noisy' else ''} |")
    return "\n".join(lines)


def others() -> str:
    """Other gateways and test runs on this machine (they share its two cores with us)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in (os.getpid(), os.getppid()):
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/{PREFIX}-" not in cmd and any(k in cmd for k in ("gateway serve", "pytest",
                                                               "sshd -D", "-m bench")):
            found.append(cmd.strip()[:60])
    return f"{len(found)} other gateway / pytest / bench processes" + (
        f" (e.g. `{found[0]}`)" if found else "")


def sweep_stale() -> None:
    """What an earlier, killed `bench noisy` left: its gateway, Docker objects, mounts, temp dir.

    Only runs of this mode (temp dir dgwnoisy-*, prefix dgwnoisy-*) whose bench process is gone.
    """
    for tmp in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        if not tmp.is_dir() or _pid_of(tmp / "bench.pid", "bench"):
            continue
        if pid := _pid_of(tmp / "gateway" / "gateway.pid", str(tmp)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            time.sleep(2)
        prefix = ""
        with contextlib.suppress(OSError):
            for line in (tmp / "gateway" / "gateway.yaml").read_text().splitlines():
                if line.startswith("prefix:"):
                    prefix = line.split(":", 1)[1].strip()
        say(f"removing leftovers of an earlier noisy run ({tmp}, {prefix or '?'})")
        if prefix.startswith(f"{PREFIX}-"):
            remove_labelled(prefix)
        unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench noisy", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=30,
                   help="bob's logins per condition (quiet and noisy) and abuse")
    p.add_argument("--rounds", type=int, default=6,
                   help="quiet/noisy block pairs the samples are split into")
    p.add_argument("--only", help="comma-separated abuses: cpu,forkbomb,memory,disk,docker")
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.add_argument("--profile", default="rootless", choices=["rootless", "hardened"])
    p.add_argument("--cpus", default="1")
    p.add_argument("--memory", default="1g")
    p.add_argument("--pids", type=int, default=512)
    p.add_argument("--disk", default="2g")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds after `go` and after clean-up before sampling")
    p.add_argument("--ramp-timeout", type=float, default=120,
                   help="seconds an abuse may take to print `go`")
    p.add_argument("--bound", type=int, default=600,
                   help="hard limit (timeout -s KILL) on each abuse session, seconds")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    memory, disk = parse_size(args.memory), parse_size(args.disk)
    cores = os.cpu_count() or 1
    chosen = abuses(cores, memory, disk, args.bound)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = set(keys) - {a.key for a in chosen}
        if unknown:
            raise SystemExit(f"unknown abuse(s): {', '.join(sorted(unknown))}")
        chosen = [a for a in chosen if a.key in keys]
    sweep_stale()
    caps = {"cpus": float(args.cpus), "memory": args.memory, "pids": args.pids,
            "disk": args.disk}
    rig = Rig(image=args.image, users=["alice", "bob"], security_profile=args.profile,
              prefix=f"{PREFIX}-{secrets.token_hex(2)}",
              tmp=Path(tempfile.mkdtemp(prefix=f"{PREFIX}-")),
              limits={"alice": caps, "bob": caps})
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    say(f"noisy neighbour: {args.samples} quiet + {args.samples} noisy logins of bob per abuse "
        f"in {args.rounds} rounds; caps {caps}; profile {args.profile}; prefix {rig.prefix}; "
        f"temp dir {rig.tmp}")
    outcomes: list[Outcome] = []
    status = 0
    context = [f"at the start: load {os.getloadavg()[0]:.1f}, {others()}"]
    try:
        rig.start(baselines=False)
        gw = rig.contenders["gateway"]
        for user in ("alice", "bob"):
            run(gw.ssh(user, "true"), f"{user}'s first login", timeout=600)
        ids = {u: docker("inspect", "-f", "{{.Id}}", rig.gateway_container(u)).strip()
               for u in ("alice", "bob")}
        if any(a.key == "docker" for a in chosen):
            run(gw.ssh("alice", PROBE_IMAGE), "alice's probe image", timeout=300)
        cleanup(gw)
        for _ in range(3):
            run(gw.ssh("bob", "true"), "bob's warm-up")
        for abuse in chosen:
            t0 = time.perf_counter()
            say(f"{abuse.key}: {abuse.title} …")
            try:
                o = measure_abuse(rig, ids, abuse, args)
            except BenchError as exc:  # the others can still be measured
                print(f"bench noisy: {abuse.key} FAILED: {exc}", file=sys.stderr, flush=True)
                status = 1
                cleanup(gw)
                continue
            outcomes.append(o)
            say(f"{abuse.key}: quiet p50 {o.quiet.p50:.3f} s, noisy p50 {o.noisy.p50:.3f} s, "
                f"{len(o.noisy.failures)} failed; {time.perf_counter() - t0:.0f} s")
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        status = 130
    except Exception as exc:  # noqa: BLE001 - report, clean up, show what was measured
        status = report_failure("bench noisy", exc,
                                {"gateway": rig.tmp / "gateway" / "gateway.log"})
    finally:
        context.append(f"at the end: load {os.getloadavg()[0]:.1f}, {others()}")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("cleaning up")
        rig.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    mach = dict(machine())
    print(f"\nRun: {stamp}, {mach.get('CPUs (nproc)', '?')}, kernel {mach.get('kernel', '?')}, "
          f"Docker {mach.get('Docker engine', '?')}, profile {args.profile}, caps "
          f"cpus {args.cpus} / memory {args.memory} / pids {args.pids} / disk {args.disk} "
          f"(alice and bob), {time.perf_counter() - started:.0f} s; "
          f"{'; '.join(context)}\n", flush=True)
    if outcomes:
        print(table(outcomes), flush=True)
        print(flush=True)
        print(host_table(outcomes), flush=True)
        for o in outcomes:
            for f in o.noisy.failures[:3] + o.quiet.failures[:3]:
                print(f"bob failed during {o.abuse.key}: {f}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
