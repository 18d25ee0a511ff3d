"""Numbers in, tables out: statistics, targets, the machine's description, stdout and markdown."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

MIB = 1024 * 1024


@dataclass
class Series:
    """Samples of one measurement for one contender."""

    key: str  # measurement id, e.g. warm_login; the first column of every table
    contender: str  # gateway | diy | plain | raw
    unit: str  # "s" (lower is better) or "MiB/s" (higher is better)
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass(frozen=True)
class Measurement:
    key: str
    title: str
    reference: str  # the contender ratios are taken against


MEASUREMENTS = [
    Measurement("warm_login", "warm login → `true` (container running)", "diy"),
    Measurement("pty_login", "pty login (`ssh -tt`, login shell) until a command typed at "
                "once has answered", "diy"),
    Measurement("cold_login", "cold first login → `true` (container and volumes absent); "
                "raw = `docker run -d` + inner dockerd ready", "raw"),
    Measurement("idle_login", "login after idle stop (container stopped, volumes kept); "
                "raw = `docker start` + inner dockerd ready", "raw"),
    Measurement("stream_up", "exec stream client → container (`head -c N /dev/zero | ssh … "
                "'wc -c'`)", "diy"),
    Measurement("stream_down", "exec stream container → client (`ssh … 'head -c N /dev/zero' "
                "| wc -c`)", "diy"),
    Measurement("sftp_put", "sftp put (upload)", "plain"),
    Measurement("sftp_get", "sftp get (download)", "plain"),
    Measurement("scp_put", "scp -O upload (classic scp protocol: `scp -t` runs remotely)",
                "plain"),
    Measurement("scp_get", "scp -O download", "plain"),
    Measurement("par_sftp_get", "4 users' sftp gets at once, aggregate (plain: 4 files of "
                "one account)", "plain"),
    Measurement("sftp_get_cpu", "CPU seconds per GiB of sftp get on the serving side (gateway "
                "or sshd and everything below it; plus dockerd, containerd and the shims for "
                "contenders using the engine), not the client", "plain"),
    Measurement("load_login", "load: login → `echo ok` time of each concurrent session", "diy"),
]
BY_KEY = {m.key: m for m in MEASUREMENTS}


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    reference: str
    op: str  # "<=" or ">="
    bound: float


TARGETS = [  # issue 14's targets
    Target("warm_login", "warm login ≤ 0.2× DIY", "diy", "<=", 0.2),
    Target("pty_login", "pty login to an answer ≤ 0.3× DIY", "diy", "<=", 0.3),
    Target("stream_up", "exec stream up ≥ 1.5× DIY (throughput)", "diy", ">=", 1.5),
    Target("stream_down", "exec stream down ≥ 1.5× DIY (throughput)", "diy", ">=", 1.5),
    Target("sftp_put", "sftp put ≥ 1.0× plain OpenSSH", "plain", ">=", 1.0),
    Target("sftp_get", "sftp get ≥ 1.0× plain OpenSSH", "plain", ">=", 1.0),
    Target("scp_put", "scp put ≥ 1.0× plain OpenSSH", "plain", ">=", 1.0),
    Target("scp_get", "scp get ≥ 1.0× plain OpenSSH", "plain", ">=", 1.0),
    Target("par_sftp_get", "4 parallel sftp gets, aggregate ≥ 0.9× plain", "plain", ">=", 0.9),
    Target("sftp_get_cpu", "CPU s per GiB of sftp get ≤ 1.5× plain sshd", "plain", "<=", 1.5),
    Target("cold_login", "cold first login ≤ 1.5× raw `docker run` + ready", "raw", "<=", 1.5),
]


@dataclass
class LoadResult:
    """One contender's load test: many sessions at once, and memory with them held open."""

    contender: str
    users: int
    sessions: int  # per burst
    bursts: int
    failures: int
    p50: float
    p95: float
    max: float
    rss_process: str  # what was measured
    rss_idle: int  # bytes, before the held sessions
    rss_open: int  # bytes, with `held` sessions open
    rss_after: int  # bytes, after they closed
    held: int  # sessions open at the moment of measuring
    hold_failures: int
    errors: list[str] = field(default_factory=list)

    @property
    def per_session(self) -> float:
        return (self.rss_open - self.rss_idle) / self.held if self.held else math.nan


LOAD_P95_BOUND = 0.25
LOAD_P95_TEXT = f"load: p95 login ≤ {LOAD_P95_BOUND}× DIY"


@dataclass
class Results:
    series: dict[tuple[str, str], Series] = field(default_factory=dict)
    load: dict[str, LoadResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, contender: str, unit: str, value: float) -> None:
        self.series.setdefault((key, contender), Series(key, contender, unit)).values.append(value)

    def ratio(self, key: str, contender: str, reference: str) -> float | None:
        a, b = self.series.get((key, contender)), self.series.get((key, reference))
        if not a or not b or not a.values or not b.values or not b.median:
            return None
        return a.median / b.median

    def rows(self) -> list[tuple[Series, float | None]]:
        order = {m.key: i for i, m in enumerate(MEASUREMENTS)}
        cont = {"gateway": 0, "gateway-engine": 1, "gateway-local": 2, "diy": 3, "plain": 4,
                "raw": 5}
        out = []
        for s in sorted(self.series.values(), key=lambda s: (order.get(s.key, 99),
                                                              cont.get(s.contender, 9))):
            ref = BY_KEY[s.key].reference if s.key in BY_KEY else s.contender
            out.append((s, self.ratio(s.key, s.contender, ref)))
        return out

    def targets(self) -> list[tuple[str, str, bool | None]]:
        """(target, value text, met?) — met None when not measured in this run."""
        out: list[tuple[str, str, bool | None]] = []
        for t in TARGETS:
            r = self.ratio(t.key, "gateway", t.reference)
            if r is None:
                out.append((t.text, "not measured", None))
                continue
            met = r <= t.bound if t.op == "<=" else r >= t.bound
            out.append((t.text, f"{r:.2f}×", met))
        gw = self.load.get("gateway")
        if gw is None:
            out.append(("load: 0 failures", "not measured", None))
            out.append(("load: ≤ 1 MiB gateway RSS per idle session", "not measured", None))
        else:
            fails = gw.failures + gw.hold_failures
            out.append((f"load ({gw.sessions} sessions, {gw.users} users): 0 failures",
                        f"{fails} of {gw.sessions * gw.bursts + gw.sessions}", fails == 0))
            per = gw.per_session / MIB
            out.append(("load: ≤ 1 MiB gateway RSS per idle session",
                        f"{per:.2f} MiB", per <= 1.0))
        r = self.load_p95_ratio("gateway")
        if r is None:
            out.append((LOAD_P95_TEXT, "not measured", None))
        else:
            out.append((LOAD_P95_TEXT, f"{r:.2f}×", r <= LOAD_P95_BOUND))
        return out

    def load_p95_ratio(self, contender: str) -> float | None:
        """The contender's p95 login under load over DIY's, or None where either is missing."""
        a, b = self.series.get(("load_login", contender)), self.series.get(("load_login", "diy"))
        if not a or not b or not a.values or not b.values:
            return None
        diy = percentile(b.values, 95)
        return percentile(a.values, 95) / diy if diy else None


    def floors(self) -> list[tuple[str, float, float, bool]]:
        """(target, gateway ratio, ratio without a container, reachable?) for each target the
        local twin measured: if the same gateway with no container at all misses a target,
        no container path of this SSH layer can meet it on this machine."""
        out = []
        for t in TARGETS:
            r = self.ratio(t.key, "gateway", t.reference)
            f = self.ratio(t.key, "gateway-local", t.reference)
            if r is not None and f is not None:
                out.append((t.text, r, f, f <= t.bound if t.op == "<=" else f >= t.bound))
        r, f = self.load_p95_ratio("gateway"), self.load_p95_ratio("gateway-local")
        if r is not None and f is not None:
            out.append((LOAD_P95_TEXT, r, f, f <= LOAD_P95_BOUND))
        return out


# --- formatting -----------------------------------------------------------------------------

def fmt(v: float, unit: str) -> str:
    if unit == "s":
        return f"{v:.3f}"
    return f"{v:.1f}"


def text_table(res: Results) -> str:
    lines = [f"{'measurement':<12} {'contender':<8} {'min':>9} {'median':>9} {'max':>9} "
             f"{'unit':<6} {'n':>4} ratio"]
    for s, ratio in res.rows():
        lines.append(f"{s.key:<12} {s.contender:<8} {fmt(min(s.values), s.unit):>9} "
                     f"{fmt(s.median, s.unit):>9} {fmt(max(s.values), s.unit):>9} "
                     f"{s.unit:<6} {len(s.values):>4} "
                     f"{'-' if ratio is None else f'{ratio:.2f}'}")
    for lr in res.load.values():
        lines.append(f"{'load_summary':<12} {lr.contender:<8} sessions={lr.sessions} "
                     f"users={lr.users} bursts={lr.bursts} failures={lr.failures} "
                     f"p50={lr.p50:.3f} p95={lr.p95:.3f} max={lr.max:.3f}")
        lines.append(f"{'load_rss':<12} {lr.contender:<8} idle_mib={lr.rss_idle / MIB:.1f} "
                     f"open_mib={lr.rss_open / MIB:.1f} after_mib={lr.rss_after / MIB:.1f} "
                     f"held={lr.held} hold_failures={lr.hold_failures} "
                     f"per_session_kib={lr.per_session / 1024:.0f}")
    lines.append("")
    for text, value, met in res.targets():
        verdict = {True: "MET", False: "NOT MET", None: "-"}[met]
        lines.append(f"target: {text}: {value}: {verdict}")
    for text, r, f, reachable in res.floors():
        lines.append(f"floor: {text}: gateway {r:.2f}×, without a container {f:.2f}×: "
                     f"{'reachable' if reachable else 'out of reach for this SSH layer'}")
    return "\n".join(lines)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    return ordered[k]


# --- the machine ------------------------------------------------------------------------------

def _cmd(*argv: str) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else "?"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    return [
        ("CPUs (nproc)", f"{os.cpu_count()} × {cpu}"),
        ("memory", mem),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Docker engine", _cmd("docker", "version", "--format", "{{.Server.Version}}")),
        ("OpenSSH", _cmd("ssh", "-V")),
        ("Python", sys.version.split()[0]),
        ("asyncssh", _version("asyncssh")),
        ("uvloop", _version("uvloop")),
        ("cryptography", _version("cryptography")),
    ]


# --- markdown -----------------------------------------------------------------------------

PROFILE_HEADING = "## Profile notes"


def markdown(res: Results, plan_text: str, mach: list[tuple[str, str]], elapsed: float,
             keep_from: str | None, chart_name: str = "benchmarks.png") -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` (see `bench/`; `--gateway-rev REV` benchmarks a "
        "commit, `--quick` is the CI size); re-run it to refresh the numbers. "
        "Everything below the \"Profile notes\" heading is kept across runs.",
        "",
        f"Run: {now}, {plan_text}, {elapsed / 60:.1f} min.",
        "",
        f"![each target's ratio against its goal (bench/chart.py)]({chart_name})",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in mach],
        "",
        "## Contenders",
        "",
        "- **gateway**: `python -m gateway serve` (this repository), hardened profile, "
        "sessions on the direct process path (`process_path: auto`: runc next to the "
        "engine). **gateway-engine**: the same code and containers with `process_path: "
        "engine` (the Engine API's exec, with spares): the before/after of the direct path, "
        "in one run. **gateway-local**: the same code with `backend: fake` (no container: "
        "processes on the host), the floor of any container path; see the last section.",
        "- **diy**: the do-it-yourself baseline: OpenSSH `sshd` on 127.0.0.1 with "
        "`ForceCommand bench/diy-wrapper.sh` (`docker exec -i [-t] -u USER -w /home/USER "
        "CONTAINER sh -c \"$SSH_ORIGINAL_COMMAND\"`) and `Subsystem sftp bench/diy-sftp.sh` "
        "(`docker exec -i … /usr/libexec/sftp-server`), into a DinD container of the same image "
        "started with the gateway's run flags and limits (checked against the gateway's "
        "container with `docker inspect` at every run).",
        "- **plain**: the same `sshd` without ForceCommand: a shell and `sftp-server` on the host, "
        "files on the host's disk.",
        "- **raw**: `docker run -d` (or `docker start`) of the same image with the same flags, "
        "plus waiting until the inner dockerd answers `/_ping` (one `docker exec` running the "
        "gateway's curl probe in a 20 ms loop). Network and empty volumes are created "
        "beforehand, untimed.",
        "",
        "Both sshd instances log in a temporary local account (`/bin/sh`, empty home, group "
        "`docker`): root's `~/.bashrc` on this machine runs `pyenv init`, which would add "
        "~0.2 s to every baseline login. Clients: OpenSSH `ssh`/`scp`/`sftp` with default "
        "algorithms; contenders run interleaved (A B C A B C …). Stream commands count the "
        "bytes with `wc -c` (instead of `cat >/dev/null`) so a short transfer fails the run.",
        "",
        "## Results",
        "",
        "Times in seconds (lower is better), throughput in MiB/s (higher is better). "
        "Ratio: the contender's median over the reference's median (reference in bold).",
        "",
        "| measurement | contender | min | median | max | unit | n | ratio |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for s, ratio in res.rows():
        m = BY_KEY.get(s.key)
        name = f"**{s.contender}**" if m and m.reference == s.contender else s.contender
        out.append(f"| {s.key} | {name} | {fmt(min(s.values), s.unit)} | {fmt(s.median, s.unit)}"
                   f" | {fmt(max(s.values), s.unit)} | {s.unit} | {len(s.values)} | "
                   f"{'' if ratio is None else f'{ratio:.2f}'} |")
    out += ["", "What each measurement is:", ""]
    out += [f"- `{m.key}`: {m.title}" for m in MEASUREMENTS]
    if res.load:
        out += ["", "## Load", "",
                "All sessions started at once (one `ssh` client each, round-robin over the "
                "users), each running `echo ok`; then the same number held open "
                "(`echo up; cat >/dev/null`) while memory was read from `/proc/PID/status` "
                "VmRSS.", "",
                "| contender | users | sessions × bursts | failures | p50 login | p95 login | "
                "max | RSS of | idle | with N open | after | per open session |",
                "| --- " + "| ---: " * 6 + "| --- " + "| ---: " * 4 + "|"]
        for lr in res.load.values():
            out.append(
                f"| {lr.contender} | {lr.users} | {lr.sessions} × {lr.bursts} | "
                f"{lr.failures} (+{lr.hold_failures} held) | {lr.p50:.3f} s | {lr.p95:.3f} s | "
                f"{lr.max:.3f} s | {lr.rss_process} | {lr.rss_idle / MIB:.1f} MiB | "
                f"{lr.rss_open / MIB:.1f} MiB (N={lr.held}) | {lr.rss_after / MIB:.1f} MiB | "
                f"{lr.per_session / 1024:.0f} KiB |")
        for lr in res.load.values():
            out += [f"- {lr.contender} error: {e}" for e in lr.errors[:5]]
    out += ["", "## Targets", "", "| target | gateway (median ratio) | met? |",
            "| --- | ---: | --- |"]
    for text, value, met in res.targets():
        verdict = {True: "met", False: "**not met**", None: "-"}[met]
        out.append(f"| {text} | {value} | {verdict} |")
    floors = res.floors()
    if floors:
        out += ["", "## Without a container: the floor", "",
                "**gateway-local** is the same gateway with `backend: fake`: her commands, "
                "shell and `sftp-server` run on the host as local processes, with no "
                "container, runc or engine in the path. What it misses, no container path of "
                "this SSH layer (asyncssh, in one Python process) can meet on this machine.",
                "", "| target | gateway | without a container | target reachable? |",
                "| --- | ---: | ---: | --- |"]
        out += [f"| {text} | {r:.2f}× | {f:.2f}× | "
                f"{'yes' if reachable else '**no**: out of reach for this SSH layer'} |"
                for text, r, f, reachable in floors]
    if res.notes:
        out += ["", "## Notes from this run", ""]
        out += [f"- {n}" for n in res.notes]
    out.append("")
    if keep_from:
        out.append(keep_from.rstrip() + "\n")
    else:
        out += [PROFILE_HEADING, "", "(none yet)", ""]
    return "\n".join(out)


def kept_section(path: Path) -> str | None:
    """The hand-written tail of an existing benchmarks.md, from the profile heading on."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    i = text.find(PROFILE_HEADING)
    return text[i:] if i >= 0 else None
