"""Issue 15's reproduction loop: the served gateway (kubernetes backend) on the test cluster,
N streams of `head -c 8 MiB; exit 7` read slowly; prints each (status, bytes) and the count
of short ones.  Needs `bash scripts/k8s-cluster.sh up`; run with the project's venv:

    REPRO_PAR=4 REPRO_READER="python3 -c '…sipper…'" .venv/bin/python scripts/k8s-exec-repro.py 200

REPRO_PAR: streams at once (1); REPRO_READER: the command between ssh and `wc -c`
(`dd bs=4k status=none`); REPRO_CMD: the remote command.  Leaves nothing behind."""

import concurrent.futures
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import USERS, GatewayProc  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 40
NODE = os.environ.get("DGW_K8S_NAME", "dgw-k8s-node")
CACHE = os.environ.get("DGW_K8S_CACHE", "/var/cache/dgw-k8s")
KUBECONFIG = os.environ.get("DGW_K8S_KUBECONFIG", f"{CACHE}/{NODE}.kubeconfig")
SIZE = 8 << 20


def kubectl(*args: str) -> str:
    return subprocess.run(["docker", "exec", NODE, "/k8s/bin/kubectl", "--kubeconfig",
                           "/var/lib/k8s/admin.kubeconfig", *args], capture_output=True,
                          text=True).stdout


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="dgw-repro-"))
    keys = {}
    for name in (*USERS, "other", "alice2"):
        keys[name] = work / f"id_{name}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(keys[name])], check=True)
    gw = GatewayProc(work, keys, backend="kubernetes", security_profile="privileged")
    gw.settings["kubernetes"] = {"kubeconfig": KUBECONFIG, "namespace": gw.prefix,
                                 "host_path": "/var/lib/k8s/pv", "image_pull_policy": "Never",
                                 "home_size": "1g", "docker_size": "2g"}
    print("prefix", gw.prefix, "log", gw.log, flush=True)
    kubectl("create", "namespace", gw.prefix)
    command = os.environ.get("REPRO_CMD", f"head -c {SIZE} /dev/zero; exit 7")
    reader = os.environ.get("REPRO_READER", "dd bs=4k status=none")

    def one(i: int) -> bool:
        t = time.monotonic()
        p = subprocess.run(["bash", "-o", "pipefail", "-c",
                            f"{shlex.join(gw.ssh_args('alice'))} {shlex.quote(command)} | "
                            f"{reader} | wc -c"],
                           capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        result = (p.returncode, p.stdout.strip().decode())
        ok = result == (7, str(SIZE))
        print(i, result, "ok" if ok else "SHORT", f"{time.monotonic() - t:.2f}s",
              p.stderr.decode(errors="replace")[-300:].strip(), flush=True)
        return not ok

    try:
        gw.start()
        first = gw.ssh("alice", "true", timeout=300)
        assert first.returncode == 0, first.stderr
        with concurrent.futures.ThreadPoolExecutor(int(os.environ.get("REPRO_PAR", "1"))) as ex:
            short = sum(ex.map(one, range(N)))
    finally:
        gw.stop()
        kubectl("delete", "namespace", gw.prefix, "--wait=false")
        kubectl("delete", "pv", "-l", f"dind-gateway.instance={gw.prefix}")
    print("SHORT", short, "of", N)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
