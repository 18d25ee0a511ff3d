"""The three contenders on this machine, and everything they need; all of it removed at the end.

- gateway: `python -m gateway serve` with a generated config and users file;
- diy: OpenSSH `sshd` whose ForceCommand is `docker exec` into a DinD container started with the
  gateway's own run flags (hardened profile) and limits;
- plain: the same `sshd` binary with no ForceCommand (a shell on the host).

Both sshd instances log in a temporary local account (shell /bin/sh, empty home, group docker)
rather than root: root's ~/.bashrc here runs `pyenv init`, which would add ~0.3 s to every
baseline login and flatter the gateway.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SECCOMP = ROOT / "gateway" / "backend" / "docker" / "profiles" / "seccomp-rootless.json"
BENCH_DIR = Path(__file__).resolve().parent
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
LABEL_INSTANCE = "dind-gateway.instance"
LABEL_OWNER = "dind-gateway.owner"
LABEL_ROLE = "dind-gateway.role"
DIY_NETWORK_POOL = ipaddress.ip_network("10.214.0.0/16")

# The same caps for every user container, gateway and DIY alike (config/users.yaml's defaults).
LIMITS = {"cpus": 2, "memory": "4g", "pids": 2000}
LIMIT_FLAGS = ["--cpus", "2", "--memory", "4g", "--memory-swap", "4g", "--pids-limit", "2000"]
# gateway/backend/docker/security.py for the hardened profile, and `_create()`'s --init.
HARDENED_FLAGS = ["--init", "--cgroupns", "private", "--cap-add", "SYS_ADMIN",
                  "--cap-add", "NET_ADMIN", "--security-opt", "seccomp=unconfined",
                  "--security-opt", "apparmor=unconfined",
                  "--security-opt", "systempaths=unconfined"]
# ... and for the rootless profile (the default): same flags as `host_config()` builds.
ROOTLESS_FLAGS = ["--init", "--cgroupns", "private", "--cap-drop", "ALL",
                  *[f for c in ("CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL")
                    for f in ("--cap-add", c)],
                  "--security-opt",
                  f"seccomp={SECCOMP}",
                  "--security-opt", "systempaths=unconfined", "--device", "/dev/net/tun",
                  "--tmpfs", "/run:exec,size=64m", "--tmpfs", "/tmp:exec,size=4g",
                  "--tmpfs", "/var/tmp:exec,size=4g"]
PROFILE_FLAGS = {"hardened": HARDENED_FLAGS, "rootless": ROOTLESS_FLAGS}
# Inner dockerd readiness, the gateway's probe, looped inside the container (20 ms period) so
# the raw baseline pays one `docker exec`, not one per poll.
READY_LOOP = ("i=0; until curl -sf --max-time 2 --unix-socket /var/run/docker.sock "
              "http://docker/_ping >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 9000 ] && exit 1; "
              "sleep 0.02; done")

SSH_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=60"]


_NETWORK_LOCK = threading.Lock()


class BenchError(Exception):
    """The harness could not set up or a measured command failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_banner(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                    timeout=1) as s:
            if s.recv(4).startswith(b"SSH-"):
                return
        time.sleep(0.1)
    raise BenchError(f"nothing listens on 127.0.0.1:{port}:\n{tail(log)}")


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def report_failure(what: str, exc: BaseException, logs: dict[str, Path]) -> int:
    """A bench run that failed: the traceback unless it is a BenchError (an expected kind of
    failure, its message says it all), then each gateway's log tail; the exit status (1)."""
    import sys
    import traceback

    if not isinstance(exc, BenchError):
        traceback.print_exc()
    print(f"{what}: FAILED: {exc}", file=sys.stderr, flush=True)
    for name, path in logs.items():
        print(f"--- {name} log tail ---\n{tail(path)}", file=sys.stderr, flush=True)
    if logs:  # after the tails too: the reason is the last line a reader (or a test) sees
        print(f"{what}: FAILED: {exc}", file=sys.stderr, flush=True)
    return 1


def _firewall():  # noqa: ANN202 - gateway.backend.docker.firewall.HostFirewall
    """The gateways' host firewall (default pool: what every gateway of a run uses)."""
    import ipaddress

    from gateway.backend.docker.firewall import HostFirewall

    return HostFirewall(ipaddress.IPv4Network("10.213.0.0/16"))


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """Run the docker CLI; its stdout as text."""
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise BenchError(f"docker {' '.join(args[:3])}…: {p.stderr.strip()}")
    return p.stdout


def remove_labelled(prefix: str, *extra: str) -> None:
    """Remove containers, then networks, then volumes carrying our instance label (and extra)."""
    flt = ["--filter", f"label={LABEL_INSTANCE}={prefix}"]
    for e in extra:
        flt += ["--filter", f"label={e}"]
    ids = docker("ps", "-aq", *flt, check=False).split()
    if ids:
        docker("rm", "-f", "-v", *ids, check=False, timeout=300)
    nets = docker("network", "ls", "-q", *flt, check=False).split()
    if nets:
        docker("network", "rm", *nets, check=False)
    vols = docker("volume", "ls", "-q", *flt, check=False).split()
    if vols:
        docker("volume", "rm", "-f", *vols, check=False)


def unmount_under(path: Path) -> None:
    """Unmount whatever is mounted below path (the gateway's loop-mounted quota disks)."""
    base = os.fspath(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh if line.split()[4].startswith(base)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", point], capture_output=True, check=False)


ACCOUNT_COMMENT = "dind-gateway bench (temporary)"


def _pid_of(pidfile: Path, marker: str) -> int | None:
    """The live process named in pidfile whose command line contains marker, else None."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if marker in cmdline else None


def sweep_stale_runs() -> None:
    """Remove what an earlier, SIGKILLed run left: processes, account, Docker objects, temp dir.

    A run is stale when the `python -m bench` process recorded in its temp dir is gone.
    """
    for pw in pwd.getpwall():
        if pw.pw_gecos != ACCOUNT_COMMENT:
            continue
        tmp = Path(pw.pw_dir).parent
        if _pid_of(tmp / "bench.pid", "bench"):
            continue  # a run in progress
        for pidfile in tmp.glob("*/*.pid"):
            if pid := _pid_of(pidfile, str(tmp)):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        try:
            prefix = yaml.safe_load((tmp / "gateway" / "gateway.yaml").read_text())["prefix"]
        except (OSError, TypeError, KeyError, yaml.YAMLError):
            prefix = None
        print(f"bench: removing leftovers of an earlier run ({pw.pw_name}, {prefix or '?'})",
              flush=True)
        time.sleep(1)
        if prefix and str(prefix).startswith("dgwbench-"):
            remove_labelled(str(prefix))
        subprocess.run(["userdel", "--force", pw.pw_name], capture_output=True)
        if tmp.name.startswith("dgwbench-"):
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Contender:
    """How to reach one contender with the OpenSSH client."""

    name: str  # gateway | diy | plain
    port: int
    keys: dict[str, Path]
    account: str = ""  # login name for every bench user; "" = the bench user's own name
    home: str = ""  # where files go: "" = the login's home (relative paths)

    def login(self, user: str) -> str:
        return f"{self.account or user}@127.0.0.1"

    def ssh(self, user: str, *command: str, opts: tuple[str, ...] = ()) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.keys[user]), *SSH_OPTS, *opts,
                self.login(user), *command]

    def scp_opts(self, user: str) -> list[str]:
        return ["-P", str(self.port), "-i", str(self.keys[user]), *SSH_OPTS]

    def path(self, name: str) -> str:
        return f"{self.home}/{name}" if self.home else name


@dataclass
class Rig:
    """Owns the temporary directory, processes and Docker objects of one benchmark run."""

    image: str
    users: list[str]  # bench users; users[0] does the single-session measurements
    prefix: str = field(default_factory=lambda: f"dgwbench-{secrets.token_hex(2)}")
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dgwbench-")))
    account: str = field(default_factory=lambda: f"dgwb{secrets.token_hex(3)}")
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    keys: dict[str, Path] = field(default_factory=dict)
    account_made: bool = False
    contenders: dict[str, Contender] = field(default_factory=dict)
    # How the gateway is launched (bench/profile.py swaps in bench.gwtrace), and extra flags.
    gateway_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "gateway"])
    gateway_args: list[str] = field(default_factory=list)
    gateway_root: Path = ROOT  # the directory `gateway/` is imported from
    security_profile: str = "hardened"  # for the gateway and the raw/DIY containers alike
    # Per-user caps in users.yaml syntax, over LIMITS (e.g. {"alice": {"disk": "2g"}}).
    limits: dict[str, dict[str, object]] = field(default_factory=dict)
    # the host firewall's chain (docker/firewall.py) was there before the run: not ours
    had_firewall: bool = field(default_factory=lambda: _firewall().chain_exists())

    # --- names ------------------------------------------------------------------------------

    @property
    def diy_prefix(self) -> str:
        return f"{self.prefix}-diy"

    def gateway_container(self, user: str) -> str:
        return f"{self.prefix}-{user}"

    def supports(self, setting: str) -> bool:
        """Whether the gateway under test knows a gateway.yaml setting (older snapshots)."""
        root = self.gateway_root / "gateway"
        return any(setting in f.read_text() for f in root.glob("config*/**/*.py"))

    def gateway_pid(self) -> int:
        return self.procs["gateway"].pid

    def sshd_pid(self, name: str) -> int:
        return self.procs[name].pid

    # --- set-up -------------------------------------------------------------------------------

    def start(self, baselines: bool = True) -> None:
        """Keys, the gateway and (unless baselines=False) the DIY and plain sshd."""
        os.chmod(self.tmp, 0o755)
        (self.tmp / "bench.pid").write_text(f"{os.getpid()}\n")
        docker("image", "inspect", self.image)
        if not baselines:  # no account, no sshd: nothing of another run's to sweep either
            self._make_keys()
            port = free_port()
            self._start_gateway(port)
            self.contenders = {"gateway": Contender("gateway", port, self.keys)}
            return
        if not os.access(SSHD, os.X_OK):
            raise BenchError(f"{SSHD} missing: apt-get install openssh-server")
        sweep_stale_runs()
        self._make_keys()
        self._make_account()
        gw_port, diy_port, plain_port = free_port(), free_port(), free_port()
        self._start_gateway(gw_port)
        self._start_sshd("diy", diy_port)
        self._start_sshd("plain", plain_port)
        home = str(self.tmp / "home")
        self.contenders = {
            "gateway": Contender("gateway", gw_port, self.keys),
            "diy": Contender("diy", diy_port, self.keys, account=self.account),
            "plain": Contender("plain", plain_port, self.keys, account=self.account, home=home),
        }

    def _make_keys(self) -> None:
        d = self.tmp / "keys"
        d.mkdir(mode=0o700)
        for user in self.users:
            path = d / f"id_{user}"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", user, "-f",
                            str(path)], check=True)
            self.keys[user] = path

    def _pub(self, user: str) -> str:
        return self.keys[user].with_suffix(".pub").read_text().strip()

    def _make_account(self) -> None:
        home = self.tmp / "home"
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", str(home),
                        "--shell", "/bin/sh", "--groups", "docker", "--comment",
                        ACCOUNT_COMMENT, self.account], check=True,
                       capture_output=True)
        self.account_made = True
        # "*": no password matches, but the account is not locked ("!" would refuse keys too).
        subprocess.run(["usermod", "-p", "*", self.account], check=True, capture_output=True)
        home.mkdir()
        pw = pwd.getpwnam(self.account)
        os.chown(home, pw.pw_uid, pw.pw_gid)

    def add_gateway(self, name: str, args: list[str], cmd: list[str] | None = None,
                    env: dict[str, str] | None = None,
                    settings: dict[str, object] | None = None) -> Contender:
        """A second gateway process (same prefix, users and containers), e.g. --no-uvloop,
        or other gateway.yaml `settings` (process_path: engine)."""
        port = free_port()
        self._start_gateway(port, name, args, cmd, env, settings)
        self.contenders[name] = Contender(name, port, self.keys)
        return self.contenders[name]

    def _start_gateway(self, port: int, name: str = "gateway", args: list[str] | None = None,
                       cmd: list[str] | None = None, env: dict[str, str] | None = None,
                       extra: dict[str, object] | None = None) -> None:
        d = self.tmp / name
        d.mkdir()
        users = {u: {"keys": [self._pub(u)], **LIMITS, **self.limits.get(u, {})}
                 for u in self.users}
        (d / "users.yaml").write_text(yaml.safe_dump({"users": users}, sort_keys=False))
        settings = {"listen": f"127.0.0.1:{port}", "users_file": "users.yaml",
                    "state_dir": "state", "image": self.image, "prefix": self.prefix,
                    "security_profile": self.security_profile, "ready_timeout": 180,
                    "log_level": "info",
                    "max_sessions": 100, "max_startups": 500}
        # Every bench client comes from 127.0.0.1: lift the per-source cap where it exists
        # (the DIY sshd has no per-source limit either).
        # (an older snapshot has gateway/config.py, newer ones the gateway/config/ package)
        config_src = "".join(p.read_text() for p in (self.gateway_root / "gateway").glob(
            "config*/**/*.py" if (self.gateway_root / "gateway" / "config").is_dir()
            else "config.py"))
        if "max_startups_per_source" in config_src:
            settings["max_startups_per_source"] = 500
        if "noauth_burst" in config_src:  # bench clients come and go without logging in too
            settings["noauth_burst"] = 100000
        settings.update(extra or {})
        (d / "gateway.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        log = d / "gateway.log"
        with open(log, "ab") as logf:
            self.procs[name] = subprocess.Popen(
                [*(cmd or self.gateway_cmd), "serve", "--config", str(d / "gateway.yaml"),
                 *(self.gateway_args if args is None else args)],
                cwd=self.gateway_root, stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        (d / "gateway.pid").write_text(f"{self.procs[name].pid}\n")
        wait_banner(port, self.procs[name], log)

    def use_gateway_rev(self, rev: str) -> str:
        """Run the gateway from a `git archive` snapshot of REV; returns the full commit id."""
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dest = self.tmp / "gateway-src"
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "gateway"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        self.gateway_root = dest
        return sha

    def _start_sshd(self, name: str, port: int) -> None:
        d = self.tmp / f"sshd-{name}"
        d.mkdir()
        os.chmod(d, 0o755)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(d / "host_key")], check=True)
        if name == "diy":
            # The wrappers are copied so the bench account can run them wherever the checkout is.
            for script in ("diy-wrapper.sh", "diy-sftp.sh"):
                shutil.copy(BENCH_DIR / script, d / script)
                os.chmod(d / script, 0o755)
            lines = [f'environment="DIY_USER={u}" {self._pub(u)}' for u in self.users]
            extra = [f"ForceCommand {d}/diy-wrapper.sh {self.diy_prefix}",
                     f"Subsystem sftp {d}/diy-sftp.sh {self.diy_prefix}",
                     "PermitUserEnvironment DIY_USER"]
        else:
            lines = [self._pub(u) for u in self.users]
            extra = [f"Subsystem sftp {SFTP_SERVER}"]
        (d / "authorized_keys").write_text("\n".join(lines) + "\n")
        os.chmod(d / "authorized_keys", 0o644)
        config = [f"ListenAddress 127.0.0.1:{port}", f"HostKey {d}/host_key",
                  f"PidFile {d}/sshd.pid", f"AuthorizedKeysFile {d}/authorized_keys",
                  f"AllowUsers {self.account}", "PermitRootLogin no", "UsePAM no",
                  "StrictModes no", "PubkeyAuthentication yes", "PasswordAuthentication no",
                  "KbdInteractiveAuthentication no", "MaxStartups 500", "MaxSessions 100",
                  "PrintMotd no", "PrintLastLog no", "UseDNS no", "LogLevel ERROR", *extra]
        (d / "sshd_config").write_text("\n".join(config) + "\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        check = subprocess.run([SSHD, "-t", "-f", str(d / "sshd_config")], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise BenchError(f"sshd config ({name}) rejected: {check.stderr.strip()}")
        log = d / "sshd.log"
        with open(log, "ab") as logf:
            self.procs[name] = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=logf,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_banner(port, self.procs[name], log)

    # --- DinD containers outside the gateway (DIY and raw baselines) --------------------------

    def run_argv(self, name: str, user: str, role: str) -> list[str]:
        """`docker run` with the gateway's flags; network and volumes named after `name`."""
        return ["docker", "run", "-d", "--name", name,
                "--label", f"{LABEL_INSTANCE}={self.prefix}",
                "--label", f"{LABEL_OWNER}={role}-{user}", "--label", f"{LABEL_ROLE}={role}",
                "--hostname", f"{user}-devbox", "--network", name,
                *PROFILE_FLAGS[self.security_profile],
                "-e", f"DGW_USER={user}", *[f for e in self.ids_env(user) for f in ("-e", e)],
                "-e", f"DGW_PROFILE={self.security_profile}",
                "--mount", f"type=volume,source={name}-home,target=/home/{user}",
                "--mount", f"type=volume,source={name}-docker,target=/var/lib/docker",
                *LIMIT_FLAGS, self.image]

    def ids_env(self, user: str) -> list[str]:
        """DGW_UID/DGW_SUBID as the gateway under test gives this user (its uids module: read
        from, or allocated in, its own state dir); uid 1000 for a gateway without per-user ids
        and under sysbox."""
        from gateway.backend.docker.uids import LEGACY, UidMap

        if (self.security_profile == "sysbox"
                or not any((self.gateway_root / "gateway").glob("**/uids.py"))):
            return [f"DGW_UID={LEGACY.uid}"]
        return UidMap(self.tmp / "gateway" / "state" / "uids.json").get(user).env()

    def prepare_objects(self, name: str, user: str, role: str) -> None:
        """The labelled network and (empty) volumes a `run_argv(name, ...)` container uses."""
        labels = ["--label", f"{LABEL_INSTANCE}={self.prefix}",
                  "--label", f"{LABEL_OWNER}={role}-{user}", "--label", f"{LABEL_ROLE}={role}"]
        for vol in (f"{name}-home", f"{name}-docker"):
            docker("volume", "create", *labels, vol)
        with _NETWORK_LOCK:  # prepared from several threads during load set-up
            self._network(name, labels)

    def _network(self, name: str, labels: list[str]) -> None:
        if docker("network", "inspect", name, check=False).strip() not in ("", "[]"):
            return
        # An explicit subnet outside Docker's default pools (they hold only ~30 bridge
        # networks) and outside the gateway's user_network_pool (10.213.0.0/16 by default).
        for _ in range(5):
            p = subprocess.run(["docker", "network", "create", *labels, "--subnet",
                                self._free_subnet(), name], capture_output=True, text=True)
            if p.returncode == 0:
                return
            if "overlap" not in p.stderr:  # else: taken meanwhile by someone else; next one
                break
        raise BenchError(f"docker network create {name}: {p.stderr.strip()}")

    @staticmethod
    def _free_subnet() -> str:
        # A network listed can be gone when inspected (a gateway or another run removing
        # one): that fails the whole inspect, so list again (CI failed on this once).
        for attempt in range(5):
            ids = docker("network", "ls", "-q").split()
            p = subprocess.run(["docker", "network", "inspect", "--format",
                                "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids],
                               capture_output=True, text=True, timeout=120)
            if p.returncode == 0:
                break
            if "not found" not in p.stderr or attempt == 4:
                raise BenchError(f"docker network inspect: {p.stderr.strip()}")
        used = [ipaddress.ip_network(n, strict=False) for n in p.stdout.split() if "." in n]
        for subnet in DIY_NETWORK_POOL.subnets(new_prefix=24):
            if not any(subnet.overlaps(u) for u in used):
                return str(subnet)
        raise BenchError(f"no free /24 in {DIY_NETWORK_POOL} for a baseline network")

    def diy_container(self, user: str) -> str:
        return f"{self.diy_prefix}-{user}"

    def start_diy(self, user: str) -> None:
        name = self.diy_container(user)
        self.prepare_objects(name, user, "diy")
        subprocess.run(self.run_argv(name, user, "diy"), check=True, capture_output=True)

    def wait_ready(self, name: str, timeout: float = 180) -> None:
        """Until the inner dockerd answers /_ping (retrying while the container comes up)."""
        deadline = time.monotonic() + timeout
        while True:
            p = subprocess.run(["docker", "exec", name, "sh", "-c", READY_LOOP],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if p.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = docker("logs", "--tail", "15", name, check=False)
                raise BenchError(f"{name} not ready: {p.stderr.strip()}\n{logs}")
            time.sleep(0.02)

    def check_parity(self, user: str) -> list[str]:
        """Differences between the gateway's and the DIY container's run settings (empty: same)."""
        gw = json.loads(docker("inspect", self.gateway_container(user)))[0]
        diy = json.loads(docker("inspect", self.diy_container(user)))[0]

        def view(c: dict) -> dict:
            hc = c["HostConfig"]
            return {
                "Init": hc.get("Init"), "CgroupnsMode": hc.get("CgroupnsMode"),
                "Privileged": hc.get("Privileged"),
                "CapAdd": sorted(c.removeprefix("CAP_") for c in hc.get("CapAdd") or []),
                "SecurityOpt": sorted(hc.get("SecurityOpt") or []),
                "MaskedPaths": hc.get("MaskedPaths") or [],
                "ReadonlyPaths": hc.get("ReadonlyPaths") or [],
                "Memory": hc.get("Memory"), "MemorySwap": hc.get("MemorySwap"),
                "NanoCpus": hc.get("NanoCpus"), "PidsLimit": hc.get("PidsLimit"),
                "Runtime": hc.get("Runtime"), "Image": c["Config"]["Image"],
                "Env": sorted(e for e in c["Config"]["Env"] if e.startswith("DGW_")),
                "Mounts": sorted((m["Type"], m["Destination"]) for m in c["Mounts"]),
                "Networks": len(c["NetworkSettings"]["Networks"]),
            }

        a, b = view(gw), view(diy)
        return [f"{k}: gateway {a[k]!r} vs diy {b[k]!r}" for k in a if a[k] != b[k]]

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    print(f"bench: {name} did not stop; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
        remove_labelled(self.prefix)
        unmount_under(self.tmp)  # users with `disk:` have quota disks under the state dir
        # the gateways' INPUT rules stay when they stop, as in production; the run's go
        if not self.had_firewall:
            _firewall().remove_all()
        if self.account_made:
            subprocess.run(["userdel", "--force", self.account], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
