"""`python -m bench [--quick] [--out FILE]`: set up, measure, tear down, report.

`python -m bench noisy [--samples N]`: bob's warm login while alice abuses her caps
(bench/noisy.py).

`python -m bench k8s [--quick]`: the Kubernetes backend next to the Docker backend
(bench/k8s.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import chart, measure
from .measure import FULL, QUICK, STAGES, Plan, say
from .report import MIB, Results, kept_section, machine, markdown, text_table
from .rig import ROOT, BenchError, Rig, report_failure

DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
DEFAULT_IMAGE = "dind-gateway/dind:latest"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for CI (4 MiB, 2 repetitions, 5 sessions over 2 users)")
    p.add_argument("--out", type=Path, help="markdown report to write (default for a full "
                   f"run: {DEFAULT_OUT.relative_to(ROOT)}; a quick run writes none)")
    p.add_argument("--no-out", action="store_true", help="write no markdown report")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="DinD image for every contender")
    p.add_argument("--profile", default="hardened", choices=["hardened", "rootless"],
                   help="security profile of the gateway and of the raw/DIY containers")
    p.add_argument("--gateway-rev", metavar="REV", help="run the gateway of this git commit "
                   "(a `git archive` snapshot) instead of the working tree's gateway/")
    p.add_argument("--only", help=f"comma-separated subset of stages: {','.join(STAGES)}")
    p.add_argument("--size-mib", type=float, help="override the stream / file size")
    p.add_argument("--reps", type=int, help="override the stream / file repetitions")
    p.add_argument("--warm-reps", type=int, help="override the warm-login repetitions")
    p.add_argument("--cold-reps", type=int, help="override the cold / idle-stop repetitions")
    p.add_argument("--load", metavar="SESSIONS:USERS", help="override the load test shape")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    changes: dict[str, object] = {}
    if args.only:
        stages = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = set(stages) - set(STAGES)
        if unknown:
            raise SystemExit(f"unknown stage(s): {', '.join(sorted(unknown))}")
        changes["stages"] = stages
    if args.size_mib:
        changes["size"] = int(args.size_mib * MIB)
    if args.reps:
        changes["reps"] = args.reps
    if args.warm_reps:
        changes["warm_reps"] = args.warm_reps
    if args.cold_reps:
        changes["cold_reps"] = args.cold_reps
    if args.load:
        sessions, users = args.load.split(":")
        changes["load_sessions"], changes["load_users"] = int(sessions), int(users)
    return dataclasses.replace(plan, **changes)


def _others() -> str:
    """Other SSH / gateway / pytest processes that could disturb the numbers."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in mine:
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "dgwbench" in cmd or "bench" in cmd.split()[2:3]:
            continue
        if any(k in cmd for k in ("gateway serve", "pytest", "sshd -D")):
            found.append(cmd.strip()[:80])
    if not found:
        return "no other gateway, sshd -D or pytest processes were running at the start"
    return (f"{len(found)} other gateway / sshd / pytest process(es) were running at the start "
            f"(numbers may be disturbed), e.g. `{found[0]}`")


def _worktree_state() -> str:
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "gateway"], capture_output=True,
                           text=True).stdout.strip()
    return f"working tree at {head}" + (" with uncommitted changes in gateway/" if dirty else "")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["noisy"]:  # bob's warm login while alice abuses her caps: bench/noisy.py
        from . import noisy
        return noisy.main(argv[1:])
    if argv[:1] == ["k8s"]:  # the Kubernetes backend next to the Docker backend: bench/k8s.py
        from . import k8s
        return k8s.main(argv[1:])
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    out = None if args.no_out else (args.out or (None if args.quick else DEFAULT_OUT))
    signal.signal(signal.SIGTERM, _interrupt)
    users = [f"u{i:02d}" for i in range(1, max(plan.load_users, 1) + 1)] + ["cold"]
    rig = Rig(image=args.image, users=users, security_profile=args.profile)
    res = Results()
    mach = machine()
    try:
        if args.gateway_rev:
            sha = rig.use_gateway_rev(args.gateway_rev)
            mach.append(("gateway code", f"commit {sha[:12]} (`--gateway-rev {args.gateway_rev}`)"))
        else:
            mach.append(("gateway code", _worktree_state()))
    except subprocess.CalledProcessError as exc:
        rig.close()
        raise SystemExit(f"bench: --gateway-rev {args.gateway_rev}: {exc.stderr}") from exc
    started = time.perf_counter()
    say(f"plan: {plan.describe()}; stages {','.join(plan.stages)}; prefix {rig.prefix}; "
        f"temp dir {rig.tmp}")
    status = 0
    try:
        rig.start()
        if rig.supports("process_path"):  # the engine's exec path, side by side (issue 14)
            rig.add_gateway("gateway-engine", [], settings={"process_path": "engine"})
        if rig.supports('"fake"'):  # the same gateway without containers: the floor
            rig.add_gateway("gateway-local", [], settings={"backend": "fake"})
        first = users[0]
        say(f"gateway :{rig.contenders['gateway'].port}, diy sshd :{rig.contenders['diy'].port}"
            f", plain sshd :{rig.contenders['plain'].port}; starting {first}'s containers")
        rig.start_diy(first)
        measure.run(rig.contenders["gateway"].ssh(first, "true"), "gateway first login",
                    timeout=600)
        rig.wait_ready(rig.diy_container(first))
        diffs = rig.check_parity(first)
        if diffs:
            raise BenchError("the DIY container is not run like the gateway's:\n  "
                             + "\n  ".join(diffs))
        res.notes.append("DIY and gateway containers: same flags and limits (docker inspect)")
        res.notes.append(_others())
        steps = {"warm": measure.warm_login, "stream": measure.streams,
                 "transfer": measure.transfers, "parallel": measure.parallel,
                 "cold": measure.cold_and_idle,
                 "load": measure.load}
        loads = [f"start {os.getloadavg()[0]:.1f}"]
        rss = [f"start {measure.rss_of(rig.gateway_pid()) / MIB:.0f}"]
        for stage in STAGES:
            if stage in plan.stages:
                t0 = time.perf_counter()
                say(f"{stage} …")
                steps[stage](rig, plan, res)
                say(f"{stage} done in {time.perf_counter() - t0:.0f} s")
                loads.append(f"{stage} {os.getloadavg()[0]:.1f}")
                rss.append(f"{stage} {measure.rss_of(rig.gateway_pid()) / MIB:.0f}")
        res.notes.append("gateway VmRSS in MiB after start (one login) and after each stage: "
                         + ", ".join(rss))
        res.notes.append(f"1-minute load average ({os.cpu_count()} cores here)"
                         " at start and after each stage: " + ", ".join(loads))
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        status = 130
    except Exception as exc:  # noqa: BLE001 - report, clean up, show what was measured
        # every gateway's log: the stage that failed may have been another contender's
        status = report_failure("bench", exc, {
            name: rig.tmp / name / "gateway.log" for name in rig.procs
            if (rig.tmp / name / "gateway.log").exists()})
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("cleaning up")
        rig.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    elapsed = time.perf_counter() - started
    print(text_table(res), flush=True)
    say(f"total {elapsed:.0f} s")
    if status == 0 and out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        text = markdown(res, plan.describe(), mach, elapsed, kept_section(out),
                        out.with_suffix(".png").name)
        out.write_text(text)
        say(f"wrote {out}")
        png = chart.redraw(out)
        say(f"wrote {png}" if png else "no chart: matplotlib is not installed "
            "(pip install -e '.[bench]')")
    return status
