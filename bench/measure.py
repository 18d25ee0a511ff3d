"""The measurements.  Each takes the rig and the plan, and adds samples to the results.

Contenders always alternate (A B C A B C …) so that drift on a noisy machine hits all of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .report import MIB, LoadResult, Results, percentile
from .rig import LABEL_INSTANCE, LABEL_OWNER, BenchError, Contender, Rig, docker

GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    warm_reps: int
    cold_reps: int
    reps: int  # streams and file transfers
    size: int  # bytes per stream / file
    load_users: int
    load_sessions: int
    load_bursts: int
    stages: tuple[str, ...] = ("warm", "stream", "transfer", "parallel", "cold", "load")

    def describe(self) -> str:
        return (f"{self.warm_reps} warm / {self.cold_reps} cold repetitions, "
                f"{self.reps} × {self.size / MIB:g} MiB streams and files, load "
                f"{self.load_sessions} sessions across {self.load_users} users "
                f"× {self.load_bursts} bursts")


FULL = Plan(warm_reps=20, cold_reps=5, reps=3, size=1024 * MIB, load_users=20,
            load_sessions=100, load_bursts=3)
QUICK = Plan(warm_reps=2, cold_reps=2, reps=2, size=4 * MIB, load_users=2, load_sessions=5,
             load_bursts=2)
STAGES = FULL.stages


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


def run(argv: list[str], what: str, *, timeout: float = 1800, expect: bytes | None = None,
        stdin: int | None = subprocess.DEVNULL) -> float:
    """Run a command to completion; its wall time.  Failure (or unexpected stdout) raises."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=stdin)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what}: timed out after {timeout:.0f} s") from exc
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"{what}: exit {p.returncode}: "
                         f"{p.stderr.decode(errors='replace').strip()[-800:]}")
    if expect is not None and p.stdout.strip() != expect:
        raise BenchError(f"{what}: expected {expect!r} on stdout, got {p.stdout[:200]!r}")
    return dt


def shell(cmd: str) -> list[str]:
    return ["bash", "-o", "pipefail", "-c", cmd]


TWINS = ("gateway-engine", "gateway-local")  # the gateway's variants, where they run


def contenders(rig: Rig, *names: str, local: bool = True) -> list[Contender]:
    """The named contenders; "gateway" brings its engine-path twin along when it runs, and
    (`local`) its twin without a container: the floor of any container path."""
    out = []
    for n in names:
        out.append(rig.contenders[n])
        if n == "gateway":
            out += [rig.contenders[t] for t in TWINS
                    if t in rig.contenders and (local or t != "gateway-local")]
    return out


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (ppid, comm, own CPU seconds: utime + stime) for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        head, rest = stat.rsplit(")", 1)
        f = rest.split()
        out[int(d)] = (int(f[1]), head.split("(", 1)[1], (int(f[11]) + int(f[12])) / tick)
    return out


ENGINE = ("dockerd", "containerd")  # and every containerd-shim below them


def _server_tree(rig: Rig, c: Contender) -> dict[int, float]:
    """Own CPU seconds of each process serving `c` now (never the client): the gateway or
    sshd process and everything below it, plus the engine (dockerd, containerd, every shim
    and what runs under them: her sftp-server on the engine's path) for its users."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    roots = [rig.procs[c.name].pid]
    if c.name not in ("plain", "gateway-local"):
        roots += [pid for pid, (_, comm, _) in table.items()
                  if comm in ENGINE or comm.startswith("containerd-shim")]
    out: dict[int, float] = {}
    todo = roots
    while todo:
        pid = todo.pop()
        if pid in out or pid not in table:
            continue
        out[pid] = table[pid][2]
        todo.extend(children.get(pid, []))
    return out


class ServerCpu:
    """CPU seconds the serving side spends while the block runs, sampled every 50 ms: a
    process that ends in between counts with its last sample (what its parent is credited
    when reaping it is not reliable: sshd's session processes never show up there)."""

    def __init__(self, rig: Rig, c: Contender) -> None:
        self.rig, self.c = rig, c
        self.seconds = 0.0

    def __enter__(self) -> ServerCpu:
        import threading

        self._start = _server_tree(self.rig, self.c)
        self._seen = dict(self._start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for pid, cpu in _server_tree(self.rig, self.c).items():
                self._seen[pid] = max(cpu, self._seen.get(pid, 0.0))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for pid, cpu in _server_tree(self.rig, self.c).items():
            self._seen[pid] = max(cpu, self._seen.get(pid, 0.0))
        self.seconds = sum(self._seen.values()) - sum(self._start.values())


# --- 1. warm login ------------------------------------------------------------------------

def warm_login(rig: Rig, plan: Plan, res: Results) -> None:
    user = rig.users[0]
    cs = contenders(rig, "gateway", "diy", "plain")
    for c in cs:  # untimed warm-up, and which cipher the client ends up with
        run(c.ssh(user, "true"), f"{c.name} warm-up")
        v = subprocess.run(c.ssh(user, "true", opts=("-v",)), capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        m = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", v.stderr)
        k = re.search(r"kex: algorithm: (\S+)", v.stderr)
        if m:
            res.notes.append(f"{c.name}: negotiated {m.group(1)} (MAC {m.group(2)}), kex "
                             f"{k.group(1) if k else '?'} with the default OpenSSH client")
    for _ in range(plan.warm_reps):
        for c in cs:
            res.add("warm_login", c.name, "s", run(c.ssh(user, "true"), f"{c.name} login"))
    for _ in range(plan.warm_reps):
        for c in cs:
            res.add("pty_login", c.name, "s", pty_login(c, user))


def pty_login(c: Contender, user: str) -> float:
    """`ssh -tt` to a login shell, a command typed at once: seconds until its answer shows
    (what a person waits for before the first command runs)."""
    import pexpect

    t0 = time.perf_counter()
    child = pexpect.spawn(c.ssh(user, opts=("-tt",))[0], c.ssh(user, opts=("-tt",))[1:],
                          timeout=120)
    try:
        child.sendline("echo PTY-$((40+2))")
        child.expect_exact(b"PTY-42")
        dt = time.perf_counter() - t0
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return dt


# --- 2. cold and idle-stop logins ---------------------------------------------------------

def _gateway_objects(rig: Rig, user: str, kind: str) -> list[str]:
    flt = ["--filter", f"label={LABEL_INSTANCE}={rig.prefix}",
           "--filter", f"label={LABEL_OWNER}={user}"]
    if kind == "container":
        return docker("ps", "-aq", *flt).split()
    return docker("volume", "ls", "-q", *flt).split()


def _purge_gateway_user(rig: Rig, user: str) -> None:
    """Container and volumes gone (the network may stay, as for the raw baseline)."""
    ids = _gateway_objects(rig, user, "container")
    if ids:
        docker("rm", "-f", *ids, timeout=300)
    vols = _gateway_objects(rig, user, "volume")
    if vols:
        docker("volume", "rm", "-f", *vols)
    if _gateway_objects(rig, user, "container") or _gateway_objects(rig, user, "volume"):
        raise BenchError(f"could not remove the gateway's objects of {user}")


def _purge_raw(rig: Rig, name: str) -> None:
    docker("rm", "-f", name, check=False, timeout=300)
    docker("volume", "rm", "-f", f"{name}-home", f"{name}-docker", check=False)


def cold_and_idle(rig: Rig, plan: Plan, res: Results) -> None:
    user = "cold"
    gw = rig.contenders["gateway"]
    raw = f"{rig.prefix}-raw-{user}"
    for _ in range(plan.cold_reps):
        _purge_gateway_user(rig, user)
        res.add("cold_login", "gateway", "s", run(gw.ssh(user, "true"), "gateway cold login"))
        _purge_raw(rig, raw)
        rig.prepare_objects(raw, user, "raw")
        t0 = time.perf_counter()
        run(rig.run_argv(raw, user, "raw"), "raw docker run")
        rig.wait_ready(raw)
        res.add("cold_login", "raw", "s", time.perf_counter() - t0)
    for _ in range(plan.cold_reps):
        ids = _gateway_objects(rig, user, "container")
        if len(ids) != 1:
            raise BenchError(f"expected one gateway container for {user}, found {ids}")
        docker("stop", *ids, timeout=120)
        res.add("idle_login", "gateway", "s", run(gw.ssh(user, "true"), "gateway login after stop"))
        docker("stop", raw, timeout=120)
        t0 = time.perf_counter()
        run(["docker", "start", raw], "raw docker start")
        rig.wait_ready(raw)
        res.add("idle_login", "raw", "s", time.perf_counter() - t0)
    _purge_gateway_user(rig, user)
    _purge_raw(rig, raw)


# --- 3. exec streams ------------------------------------------------------------------------

def streams(rig: Rig, plan: Plan, res: Results) -> None:
    user, n = rig.users[0], plan.size
    cs = contenders(rig, "gateway", "diy", "plain")
    want = str(n).encode()
    for _ in range(plan.reps):
        for c in cs:
            up = f"head -c {n} /dev/zero | {shlex.join(c.ssh(user, 'wc -c'))}"
            res.add("stream_up", c.name, "MiB/s",
                    n / MIB / run(shell(up), f"{c.name} stream up", expect=want))
    for _ in range(plan.reps):
        for c in cs:
            down = f"{shlex.join(c.ssh(user, f'head -c {n} /dev/zero'))} | wc -c"
            res.add("stream_down", c.name, "MiB/s",
                    n / MIB / run(shell(down), f"{c.name} stream down", expect=want))


# --- 4. sftp and scp ------------------------------------------------------------------------

def _remote_size(rig: Rig, c: Contender, user: str, name: str) -> int:
    if c.home:
        return os.path.getsize(c.path(name))
    out = subprocess.run(c.ssh(user, f"stat -c %s {name}"), capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    return int(out.stdout.strip() or -1)


def transfers(rig: Rig, plan: Plan, res: Results) -> None:
    user, n = rig.users[0], plan.size
    cs = contenders(rig, "gateway", "diy", "plain")
    src = rig.tmp / "src.bin"
    subprocess.run(shell(f"head -c {n} /dev/zero > {shlex.quote(str(src))}"), check=True)
    remote = "bench.bin"

    def sftp(c: Contender, line: str) -> list[str]:
        batch = rig.tmp / f"sftp-{c.name}.batch"
        batch.write_text(line + "\n")
        return ["sftp", "-q", "-b", str(batch), *c.scp_opts(user), c.login(user)]

    def scp(c: Contender, a: str, b: str) -> list[str]:
        return ["scp", "-O", "-q", *c.scp_opts(user), a, b]

    def put(c: Contender, tool: str) -> float:
        run(c.ssh(user, f"rm -f {c.path(remote)}"), f"{c.name} rm")
        argv = (sftp(c, f"put {src} {c.path(remote)}") if tool == "sftp"
                else scp(c, str(src), f"{c.login(user)}:{c.path(remote)}"))
        dt = run(argv, f"{c.name} {tool} put")
        got = _remote_size(rig, c, user, remote)
        if got != n:
            raise BenchError(f"{c.name} {tool} put: remote file has {got} bytes, not {n}")
        return dt

    def get(c: Contender, tool: str) -> float:
        dst = rig.tmp / f"dl-{c.name}.bin"
        argv = (sftp(c, f"get {c.path(remote)} {dst}") if tool == "sftp"
                else scp(c, f"{c.login(user)}:{c.path(remote)}", str(dst)))
        with ServerCpu(rig, c) as cpu:
            dt = run(argv, f"{c.name} {tool} get")
        if tool == "sftp":
            res.add("sftp_get_cpu", c.name, "s/GiB", cpu.seconds / (n / GIB))
        got = dst.stat().st_size
        dst.unlink()
        if got != n:
            raise BenchError(f"{c.name} {tool} get: local file has {got} bytes, not {n}")
        return dt

    for tool in ("sftp", "scp"):
        for _ in range(plan.reps):
            for c in cs:
                res.add(f"{tool}_put", c.name, "MiB/s", n / MIB / put(c, tool))
        for _ in range(plan.reps):
            for c in cs:
                res.add(f"{tool}_get", c.name, "MiB/s", n / MIB / get(c, tool))
    src.unlink()
    for c in cs:
        subprocess.run(c.ssh(user, f"rm -f {c.path(remote)}"), capture_output=True,
                       stdin=subprocess.DEVNULL)


# --- 4b. parallel sftp ------------------------------------------------------------------------

PARALLEL = 4


def parallel(rig: Rig, plan: Plan, res: Results) -> None:
    """4 users download a file each at once (gateway: from their own containers; plain: 4
    files of the one account): aggregate MiB/s, and how far apart the four finished."""
    users = [u for u in rig.users if u != "cold"][:PARALLEL]
    n = plan.size
    cs = [*contenders(rig, "gateway"), rig.contenders["plain"]]
    names = {c.name: [c.path(f"par-{i}.bin") for i in range(len(users))] for c in cs}
    for c in cs:
        for user, name in zip(users, names[c.name], strict=True):
            run(c.ssh(user, f"head -c {n} /dev/zero > {name}"), f"{c.name} parallel file",
                timeout=600)
    spreads: dict[str, list[float]] = {}
    busy: dict[str, list[float]] = {}  # the gateway process itself, share of one core
    for _ in range(plan.reps):
        for c in cs:
            pid = rig.procs[c.name].pid if c.name != "plain" else None
            cpu0 = _proc_table()[pid][2] if pid else 0.0
            procs, t0 = [], time.perf_counter()
            for i, (user, name) in enumerate(zip(users, names[c.name], strict=True)):
                batch = rig.tmp / f"par-{c.name}-{i}.batch"
                batch.write_text(f"get {name} /dev/null\n")
                procs.append(subprocess.Popen(
                    ["sftp", "-q", "-b", str(batch), *c.scp_opts(user), c.login(user)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            ends = []
            for proc in procs:
                _, err = proc.communicate(timeout=1800)
                ends.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise BenchError(f"{c.name} parallel sftp get failed: {err.decode()[-300:]}")
            res.add("par_sftp_get", c.name, "MiB/s", len(users) * n / MIB / max(ends))
            spreads.setdefault(c.name, []).append(max(ends) / min(ends) - 1)
            if pid:
                busy.setdefault(c.name, []).append(
                    (_proc_table()[pid][2] - cpu0) / max(ends))
    for c in cs:
        run(c.ssh(users[0], "rm -f " + " ".join(names[c.name])), f"{c.name} rm", timeout=60)
        for user in users[1:] if c.name != "plain" else []:
            run(c.ssh(user, "rm -f par-*.bin"), f"{c.name} rm", timeout=60)
    res.notes.append(f"parallel sftp get ({len(users)} users × {n / MIB:g} MiB at once): the "
                     "last download took longer than the first by " + ", ".join(
                         f"{name} {100 * max(v):.0f} %" for name, v in spreads.items())
                     + " (worst of the runs)")
    if busy:  # one process: what is left of its core says whether a second would help here
        res.notes.append("parallel sftp get: the gateway process itself was busy " + ", ".join(
            f"{name} {100 * statistics.median(v):.0f} %" for name, v in busy.items())
            + " of one core (median of the runs; its children and the clients not counted)")


# --- 5. load ---------------------------------------------------------------------------------

def rss_of(pid: int) -> int:
    """VmRSS of one process, bytes."""
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) * 1024 if m else 0


def rss_with_children(pid: int) -> int:
    """VmRSS of a process plus the private (anonymous) memory of everything below it: the
    direct path's runc processes share their binary's pages, so VmRSS would count those once
    per session."""
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _) in _proc_table().items():
        children.setdefault(ppid, []).append(child)
    total, todo = rss_of(pid), list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            m = re.search(r"RssAnon:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text())
        except OSError:
            continue
        total += int(m.group(1)) * 1024 if m else 0
        todo.extend(children.get(p, []))
    return total


def rss_of_tree(pid: int) -> int:
    """VmRSS summed over a process and all its descendants (shared pages counted each time)."""
    children: dict[int, list[int]] = {}
    for child, (ppid, _, _) in _proc_table().items():
        children.setdefault(ppid, []).append(child)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_of(p)
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return total


def prepare_load_users(rig: Rig, users: list[str]) -> None:
    """Every load user's container running and ready, for the gateway and for DIY."""
    gw = rig.contenders["gateway"]

    def one(user: str) -> None:
        try:
            run(gw.ssh(user, "true"), f"gateway first login of {user}", timeout=600)
        except BenchError as exc:
            if "address pool" in str(exc):
                raise BenchError(f"{exc}\nDocker ran out of bridge-network address pools (the "
                                 "gateway makes one network per user; stock dockerd allows "
                                 "~30). Remove stale networks or set default-address-pools "
                                 "in /etc/docker/daemon.json.") from exc
            raise
        name = rig.diy_container(user)
        if docker("inspect", "-f", "{{.State.Running}}", name, check=False).strip() != "true":
            rig.start_diy(user)
        rig.wait_ready(rig.diy_container(user), timeout=600)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(one, u) for u in users]:
            f.result()


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def _burst(c: Contender, users: list[str], n: int, command: str,
                 hold: bool) -> tuple[list[float], list[str], list[asyncio.subprocess.Process]]:
    """Start n sessions at once; login → first output line times, errors, held processes."""

    async def one(i: int) -> tuple[float | None, str, asyncio.subprocess.Process | None]:
        user = users[i % len(users)]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *c.ssh(user, command), stdin=asyncio.subprocess.PIPE if hold else
            asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            if hold:
                line = await asyncio.wait_for(proc.stdout.readline(), 300)
                if line == b"up\n":
                    return time.perf_counter() - t0, "", proc
                _kill(proc)
                err = await proc.stderr.read()
                await proc.wait()
                return None, (f"{user}: exit {proc.returncode} {line!r} "
                              f"{err.decode(errors='replace').strip()[-300:]}"), None
            out, err = await asyncio.wait_for(proc.communicate(), 300)
            dt = time.perf_counter() - t0
            if proc.returncode == 0 and out == b"ok\n":
                return dt, "", None
            return None, (f"{user}: exit {proc.returncode} {out[:100]!r} "
                          f"{err.decode(errors='replace').strip()[-300:]}"), None
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            return None, f"{user}: timed out", None

    outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    times = [t for t, _, _ in outcomes if t is not None]
    errors = [e for _, e, _ in outcomes if e]
    held = [p for _, _, p in outcomes if p is not None]
    return times, errors, held


async def _release(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.stdin:
            p.stdin.close()

    async def wait(p: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(p.communicate(), 60)
        except TimeoutError:
            _kill(p)
            await p.wait()

    await asyncio.gather(*(wait(p) for p in procs))


def load(rig: Rig, plan: Plan, res: Results) -> None:
    users = rig.users[:plan.load_users]
    say(f"load: preparing {len(users)} users on gateway and diy")
    prepare_load_users(rig, users)
    asyncio.run(_load(rig, plan, res, users))


async def _load(rig: Rig, plan: Plan, res: Results, users: list[str]) -> None:
    # the local twin logs in too (its p95 is the floor of the load target); its memory is
    # not measured: its sessions' processes are on the host, not in containers
    cs = contenders(rig, "gateway", "diy")
    rss = {"gateway": lambda: rss_with_children(rig.gateway_pid()),
           "gateway-engine": lambda: rss_with_children(rig.procs["gateway-engine"].pid),
           "diy": lambda: rss_of_tree(rig.sshd_pid("diy"))}
    what = {"gateway": "gateway process + private memory of its runc children",
            "gateway-engine": "gateway process (engine path: no children)",
            "diy": "sshd + docker CLI process tree"}
    times: dict[str, list[float]] = {c.name: [] for c in cs}
    errors: dict[str, list[str]] = {c.name: [] for c in cs}
    for b in range(plan.load_bursts):
        for c in cs:
            t, e, _ = await _burst(c, users, plan.load_sessions, "echo ok", hold=False)
            say(f"load: burst {b + 1} {c.name}: {len(t)} ok, {len(e)} failed")
            times[c.name] += t
            errors[c.name] += e
            for v in t:
                res.add("load_login", c.name, "s", v)
            await asyncio.sleep(1)
    for c in cs:
        if c.name not in rss:
            continue
        await asyncio.sleep(1)
        idle = rss[c.name]()
        t, e, procs = await _burst(c, users, plan.load_sessions, "echo up; cat >/dev/null",
                                   hold=True)
        try:
            await asyncio.sleep(1)
            open_rss = rss[c.name]()
        finally:
            await _release(procs)
        say(f"load: {c.name}: {len(t)} held open, {len(e)} failed")
        await asyncio.sleep(2)
        after = rss[c.name]()
        res.load[c.name] = LoadResult(
            contender=c.name, users=len(users), sessions=plan.load_sessions,
            bursts=plan.load_bursts,
            failures=plan.load_sessions * plan.load_bursts - len(times[c.name]),
            p50=percentile(times[c.name], 50), p95=percentile(times[c.name], 95),
            max=max(times[c.name], default=float("nan")), rss_process=what[c.name],
            rss_idle=idle, rss_open=open_rss, rss_after=after, held=len(t),
            hold_failures=plan.load_sessions - len(t), errors=errors[c.name] + e)
