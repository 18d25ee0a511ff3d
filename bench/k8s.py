"""`python -m bench k8s`: the Kubernetes backend next to the Docker backend (issue 15).

Two gateways of the working tree run side by side with the same users and keys: `docker`
(the Docker backend, the bench's usual profile) and `kubernetes` (the Kubernetes backend on
the one-node cluster of scripts/k8s-cluster.sh, privileged pods, hostPath volumes).  The
cluster is used when it runs, else started here and removed at the end.  Measured with the
OpenSSH client, the contenders alternating in every round (docker, kubernetes, docker, …) so
drift on a shared machine hits both; each figure is a median, and the ratio is
kubernetes / docker from the same run (absolute times on this shared 2-core VM mean little):

- first_login: `ssh u true` for a user never seen before (no pod / container, no volumes):
  objects made, pod scheduled, inner dockerd answering, then the command;
- start_login: the same after her environment was stopped the backend's way (Kubernetes:
  pod deleted, claims kept; Docker: container stopped);
- warm_login: `ssh u true` with her pod / container running;
- stream_down / stream_up: `ssh u 'head -c N /dev/zero' | wc -c` and
  `head -c N /dev/zero | ssh u 'cat >/dev/null; echo done'` in MiB/s (the exec stream: a
  websocket exec through the API server and kubelet vs the Docker backend's direct path).

Prints a table (min / median / max per contender, ratio against docker); writes nothing
into the repository (docs/benchmarks.md quotes a run by hand).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .measure import run, say, shell
from .report import MIB, Results, fmt, machine
from .rig import ROOT, BenchError, Rig, docker, report_failure

DEFAULT_IMAGE = "dind-gateway/dind:latest"
NODE = os.environ.get("DGW_K8S_NAME", "dgw-k8s-node")
CLUSTER = ["bash", str(ROOT / "scripts" / "k8s-cluster.sh")]
HOST_PATH = "/var/lib/k8s/pv"  # on the node's own volume (scripts/k8s-node.sh)
KEYS = ("first_login", "start_login", "warm_login", "stream_down", "stream_up")
TITLES = {
    "first_login": "first login → `true` (no pod / container, no volumes yet)",
    "start_login": "login after stop → `true` (Kubernetes: pod deleted, claims kept; "
                   "Docker: container stopped)",
    "warm_login": "warm login → `true` (pod / container running)",
    "stream_down": "exec stream down (`ssh … 'head -c N /dev/zero' | wc -c`)",
    "stream_up": "exec stream up (`head -c N /dev/zero | ssh … 'cat >/dev/null'`)",
}
CONTENDERS = ("docker", "kubernetes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench k8s", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI size: 2 first logins, 2 stops, 3 warm logins, 2 × 8 MiB streams")
    p.add_argument("--first-reps", type=int, help="first logins (one new user each; default 3)")
    p.add_argument("--warm-reps", type=int, help="warm logins (default 15)")
    p.add_argument("--reps", type=int, help="streams per direction (default 3)")
    p.add_argument("--size-mib", type=float, help="stream size (default 256)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help="DinD image for both backends")
    p.add_argument("--profile", default="hardened", choices=["hardened", "rootless"],
                   help="security profile of the Docker backend (Kubernetes: privileged, "
                   "its only one; --privileged is refused by this VM's Docker)")
    return p


class Cluster:
    """The scripts/k8s-cluster.sh node: used when running, else started (and removed)."""

    def __init__(self) -> None:
        self.ours = False
        self.kubeconfig = Path(os.environ.get("DGW_K8S_CACHE", "/var/cache/dgw-k8s")) / \
            f"{NODE}.kubeconfig"
        self.kubeconfig = Path(os.environ.get("DGW_K8S_KUBECONFIG", self.kubeconfig))

    def up(self) -> None:
        running = docker("inspect", "-f", "{{.State.Running}}", NODE, check=False).strip()
        if running == "true" and self.kubeconfig.exists():
            return
        say("starting the Kubernetes cluster (scripts/k8s-cluster.sh up)")
        self.ours = True
        p = subprocess.run([*CLUSTER, "up"], capture_output=True, text=True, timeout=3600)
        if p.returncode != 0:
            raise BenchError(f"k8s-cluster.sh up failed:\n{p.stderr[-3000:]}")
        self.kubeconfig = Path(p.stdout.strip().splitlines()[-1])

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        p = subprocess.run(["docker", "exec", NODE, "/k8s/bin/kubectl", "--kubeconfig",
                            "/var/lib/k8s/admin.kubeconfig", *args], capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise BenchError(f"kubectl {' '.join(args[:3])}…: {p.stderr.strip()}")
        return p.stdout

    def down(self) -> None:
        if self.ours:
            subprocess.run([*CLUSTER, "down"], capture_output=True, timeout=300)


def stop_env(rig: Rig, cluster: Cluster, name: str, user: str) -> None:
    """Stop her environment the backend's own way, and wait until it is stopped."""
    if name == "docker":
        docker("stop", rig.gateway_container(user), timeout=120)
    else:
        cluster.kubectl("-n", rig.prefix, "delete", "pod", f"{rig.prefix}-{user}", "--wait=true",
                        "--grace-period=1", timeout=180)


def table(res: Results) -> str:
    lines = [f"{'measurement':<12} {'contender':<10} {'min':>9} {'median':>9} {'max':>9} "
             f"{'unit':<6} {'n':>4} ratio"]
    for key in KEYS:
        for c in CONTENDERS:
            s = res.series.get((key, c))
            if s is None:
                continue
            ratio = res.ratio(key, c, "docker")
            lines.append(f"{key:<12} {c:<10} {fmt(min(s.values), s.unit):>9} "
                         f"{fmt(s.median, s.unit):>9} {fmt(max(s.values), s.unit):>9} "
                         f"{s.unit:<6} {len(s.values):>4} "
                         f"{'-' if ratio is None else f'{ratio:.2f}'}")
    return "\n".join(lines)


def measure(rig: Rig, cluster: Cluster, args: argparse.Namespace, res: Results) -> None:
    gws = {c: rig.contenders[c] for c in CONTENDERS}
    first_reps = args.first_reps or (2 if args.quick else 3)
    warm_reps = args.warm_reps or (3 if args.quick else 15)
    reps = args.reps or (2 if args.quick else 3)
    size = int((args.size_mib or (8 if args.quick else 256)) * MIB)
    # first logins: a new user each round, both backends in turn
    for i in range(first_reps):
        user = f"k{i:02d}"
        for name, gw in gws.items():
            res.add("first_login", name, "s",
                    run(gw.ssh(user, "true"), f"{name} first login of {user}", timeout=600))
    main = "k00"
    # logins after a stop
    for _ in range(first_reps):
        for name, gw in gws.items():
            stop_env(rig, cluster, name, main)
            res.add("start_login", name, "s",
                    run(gw.ssh(main, "true"), f"{name} login after stop", timeout=600))
    for gw in gws.values():
        run(gw.ssh(main, "true"), "warm-up")
    for _ in range(warm_reps):
        for name, gw in gws.items():
            res.add("warm_login", name, "s", run(gw.ssh(main, "true"), f"{name} warm login"))
    want = str(size).encode()
    for _ in range(reps):
        for name, gw in gws.items():
            down = f"{shlex.join(gw.ssh(main, f'head -c {size} /dev/zero'))} | wc -c"
            res.add("stream_down", name, "MiB/s",
                    size / MIB / run(shell(down), f"{name} stream down", expect=want))
    for _ in range(reps):
        for name, gw in gws.items():
            up = (f"head -c {size} /dev/zero | "
                  f"{shlex.join(gw.ssh(main, 'cat >/dev/null && echo done'))}")
            res.add("stream_up", name, "MiB/s",
                    size / MIB / run(shell(up), f"{name} stream up", expect=b"done"))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    first_reps = args.first_reps or (2 if args.quick else 3)
    users = [f"k{i:02d}" for i in range(first_reps)]
    rig = Rig(image=args.image, users=users, security_profile=args.profile)
    cluster = Cluster()
    res = Results()
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    say(f"kubernetes vs docker backend; prefix {rig.prefix}; temp dir {rig.tmp}")
    status = 0
    namespace = False
    try:
        cluster.up()
        cluster.kubectl("create", "namespace", rig.prefix)
        namespace = True
        rig.start(baselines=False)
        rig.contenders["docker"] = rig.contenders.pop("gateway")
        rig.procs["docker"] = rig.procs.pop("gateway")
        rig.add_gateway("kubernetes", [], settings={
            "backend": "kubernetes", "security_profile": "privileged",
            "kubernetes": {"kubeconfig": str(cluster.kubeconfig), "namespace": rig.prefix,
                           "host_path": HOST_PATH, "image_pull_policy": "Never",
                           "home_size": "1g", "docker_size": "2g"}})
        load = os.getloadavg()[0]
        measure(rig, cluster, args, res)
        res.notes.append(f"1-minute load average {load:.1f} at the start, "
                         f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores)")
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        status = 130
    except Exception as exc:  # noqa: BLE001 - report, clean up, show what was measured
        status = report_failure("bench k8s", exc, {
            "docker gateway": rig.tmp / "gateway" / "gateway.log",
            "kubernetes gateway": rig.tmp / "kubernetes" / "gateway.log"})
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("cleaning up")
        rig.close()  # both gateways stopped, the Docker backend's objects removed
        if namespace:
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                cluster.kubectl("delete", "namespace", rig.prefix, "--wait=true", timeout=180)
                cluster.kubectl("delete", "pv", "-l", f"dind-gateway.instance={rig.prefix}")
                # hostPath volumes: nothing in the cluster deletes their directories
                docker("exec", NODE, "rm", "-rf", f"{HOST_PATH}/{rig.prefix}", check=False)
        cluster.down()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    mach = dict(machine())
    print(f"\nRun: {mach.get('CPUs (nproc)', '?')}, kernel {mach.get('kernel', '?')}, Docker "
          f"{mach.get('Docker engine', '?')}; docker backend profile {args.profile}, "
          f"kubernetes 1.20 one-node cluster (privileged pods); "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    for key in KEYS:
        print(f"  {key}: {TITLES[key]}", flush=True)
    for note in res.notes:
        print(f"  {note}", flush=True)
    print(table(res), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
