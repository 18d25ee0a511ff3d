"""Issue 18: the default `rootless` profile on a cgroup v2 + AppArmor host (Debian 12 in a VM).

Run by `bash scripts/vm-host.sh test`. Each session is the host's OpenSSH client through the
guest's forwarded gateway port; what the gateway and the guest's engine did is read as root in
the guest. Timeouts are scaled (conftest.scaled); nothing waits on a clock, only on conditions.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shlex
import subprocess
from pathlib import Path

import pytest

from ..conftest import free_port, wait_for
from ..test_direct import PROBE
from ..test_isolation import PROBE_IMAGE, REWRITE
from ..test_workflow import PYWEB
from .conftest import Guest, VMGateway, scaled, vm_users

DOCKERFILE = 'FROM probe\nRUN ["/usr/bin/dash", "-c", "echo built-in-the-vm > /built"]\n'


def run(gw: VMGateway, command: str, user: str = "alice",
        timeout: float = scaled(60)) -> tuple[int, str]:
    r = gw.ssh(user, command, timeout=timeout)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def test_guest_is_a_modern_host(guest: Guest) -> None:
    out = guest.run("stat -fc %T /sys/fs/cgroup; cat /sys/module/apparmor/parameters/enabled; "
                    "docker info -f '{{.CgroupVersion}} {{.SecurityOptions}}'; "
                    "aa-status --enabled && echo aa-enforcing")
    assert out.split()[:3] == ["cgroup2fs", "Y", "2"], out
    assert "name=apparmor" in out and "aa-enforcing" in out, out


def test_first_login_then_inner_run_and_build(vmgw: VMGateway) -> None:
    r = vmgw.ssh("alice", "docker info -f '{{.SecurityOptions}} {{.CgroupVersion}}'",
                 timeout=scaled(90))
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0 and "rootless" in out, out
    assert "Starting your Docker environment" in r.stderr.decode(), out  # (first login)
    print("inner daemon:", r.stdout.decode().strip())
    code, out = run(vmgw, f"{PROBE_IMAGE} && docker run --rm probe /usr/bin/cat /etc/hostname",
                    timeout=scaled(120))
    assert code == 0 and out.strip(), out
    code, out = run(vmgw, f"mkdir -p ctx && printf '{DOCKERFILE}' > ctx/Dockerfile && "
                          "docker build -q -t built ctx >/dev/null && "
                          "docker run --rm built /usr/bin/cat /built", timeout=scaled(120))
    assert code == 0 and out.strip().endswith("built-in-the-vm"), out
    # not unconfined: docker-default plus only the mounts rootless needs (security.py)
    assert vmgw.inspect("alice", "{{.AppArmorProfile}}") == "dgw-rootless"
    assert "dgw-rootless (enforce)" in vmgw.guest.run(
        "cat /sys/kernel/security/apparmor/profiles")


def test_killed_by_a_signal_ends_as_with_sshd(vmgw: VMGateway) -> None:
    """exit-signal on the guest's kernel (6.1: the process-events connector without the
    6.6 filter, see backend/docker/exits.py): OpenSSH's `ssh` exits 255 as with sshd."""
    r = vmgw.ssh("alice", "echo before; kill -TERM $$", timeout=scaled(30))
    assert (r.returncode, r.stdout) == (255, b"before\n"), r.stderr
    r = vmgw.ssh("alice", "exit 143", timeout=scaled(30))
    assert r.returncode == 143, r.stderr


def test_her_launcher_forks_sessions_as_docker_exec_makes_them(vmgw: VMGateway) -> None:
    """Under AppArmor and cgroup v2 too: once her session launcher answers (launcher.py), a
    session it forks is, line for line of the probe (AppArmor label, capability sets,
    seccomp, no_new_privs, cgroup, namespaces, rlimits), what `docker exec -u alice` makes."""
    assert vmgw.ssh("alice", "true", timeout=scaled(90)).returncode == 0
    assert wait_for(lambda: "session launcher of alice ready" in vmgw.tail(2000), scaled(30)), \
        vmgw.tail()
    forked = vmgw.tail(5000).count("session of alice forked by her launcher")
    r = vmgw.ssh("alice", PROBE, timeout=scaled(30))
    assert r.returncode == 0, r.stderr
    assert vmgw.tail(5000).count("session of alice forked by her launcher") == forked + 1
    engine = vmgw.guest.run(f"docker exec -u alice {vmgw.container_name('alice')} "
                            f"sh -c {shlex.quote(PROBE)}")
    assert r.stdout.decode().splitlines() == engine.splitlines()
    assert "apparmor dgw-rootless (enforce)" in r.stdout.decode(), r.stdout


def test_caps_in_the_cgroup_v2_files(vmgw: VMGateway) -> None:
    want = {"memory.max": "536870912", "pids.max": "300", "cpu.max": "100000 100000"}
    # as she sees them: her private cgroup namespace puts her own cgroup at /sys/fs/cgroup
    code, out = run(vmgw, "cd /sys/fs/cgroup && for f in memory.max pids.max cpu.max; do "
                          "printf '%s=%s\\n' $f \"$(cat $f)\"; done")
    assert code == 0, out
    assert dict(line.split("=", 1) for line in out.splitlines()) == want, out
    # and on the guest, the container's own cgroup directory
    d = vmgw.cgroup_dir("alice")
    assert d, "no cgroup directory for alice's container"
    for f, v in want.items():
        assert vmgw.guest.run(f"cat {d}/{f}").strip() == v, (d, f)


def test_live_limit_change(vmgw: VMGateway, keys: dict[str, Path]) -> None:
    assert run(vmgw, "true")[0] == 0
    d = vmgw.cgroup_dir("alice")
    vmgw.write_users(vm_users(keys, memory="768m", pids=400, cpus=0.5))

    def applied() -> bool:
        return vmgw.guest.run(f"cat {d}/memory.max {d}/pids.max {d}/cpu.max").split() == \
            ["805306368", "400", "50000", "100000"]
    assert wait_for(applied, scaled(10), interval=1), vmgw.tail(40)
    # she sees it too, without a restart (same container)
    code, out = run(vmgw, "cat /sys/fs/cgroup/pids.max")
    assert out.strip() == "400", out
    vmgw.write_users(vm_users(keys))
    assert wait_for(lambda: vmgw.guest.run(f"cat {d}/pids.max").strip() == "300",
                    scaled(10), interval=1), vmgw.tail(40)


def test_own_cgroup_v2_limits_are_read_only(vmgw: VMGateway) -> None:
    for f in ("pids.max", "memory.max", "cpu.max", "cgroup.subtree_control"):
        path = f"/sys/fs/cgroup/{f}"
        code, out = run(vmgw, f"{REWRITE.format(p=path)}; echo rc=$?; "
                              f"unshare -r sh -c '{REWRITE.format(p=path)}'; echo rc2=$?")
        assert "rc=0" not in out and "rc2=0" not in out, (f, out)


def test_disk_quota_enospc(vmgw: VMGateway) -> None:
    r = vmgw.ssh("alice", "df -B1M --output=size ~ | tail -1", timeout=scaled(90))
    assert r.returncode == 0 and 200 < int(r.stdout) <= 300, r
    code, out = run(vmgw, "dd if=/dev/zero of=~/fill bs=1M count=400 2>&1; echo rc=$?; "
                          "rm -f ~/fill", timeout=scaled(60))
    assert "No space left on device" in out and "rc=0" not in out, out
    r = vmgw.ssh("bob", "echo bob-fine", timeout=scaled(90))  # (may be his first login)
    assert (r.returncode, r.stdout) == (0, b"bob-fine\n"), r


def test_local_forward_to_a_published_inner_port(vmgw: VMGateway) -> None:
    code, out = run(vmgw, f"cd / && {PYWEB} && docker rm -f web >/dev/null 2>&1; "
                          "docker run -d --name web -p 8080:80 -w /usr pyweb "
                          "/usr/bin/python3.11 -m http.server 80", user="bob",
                    timeout=scaled(180))
    assert code == 0, out
    port = free_port()
    tunnel = subprocess.Popen([*vmgw.ssh_args("bob", None, "-N", "-L",
                                              f"127.0.0.1:{port}:localhost:8080")],
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def fetch() -> bool:
            r = subprocess.run(["curl", "-s", "--max-time", str(int(scaled(3))),
                                f"http://127.0.0.1:{port}/"], capture_output=True)
            return b"Directory listing" in r.stdout
        assert wait_for(fetch, scaled(30), interval=1), "no answer through ssh -L"
    finally:
        tunnel.terminate()
        tunnel.wait(30)
        run(vmgw, "docker rm -f web", user="bob")


def test_sftp_of_a_file(vmgw: VMGateway, tmp_path: Path) -> None:
    src = tmp_path / "payload.bin"
    src.write_bytes(secrets.token_bytes(3 << 20))
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} payload.bin\nget payload.bin {tmp_path / 'back.bin'}\n")
    args = vmgw.ssh_args("alice")
    sftp = ["sftp", "-b", str(batch), "-P", str(vmgw.port), *args[3:-1], args[-1]]
    r = subprocess.run(sftp, capture_output=True, timeout=scaled(60))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    code, out = run(vmgw, "sha256sum payload.bin && rm payload.bin")
    assert out.split()[0] == hashlib.sha256(src.read_bytes()).hexdigest(), out


def test_init_cgroup_v2_nesting_under_hardened(guest: Guest) -> None:
    """dind-init's cgroup v2 branch (hardened/privileged only: rootless has no capability to
    touch cgroupfs): PID 1 moved to /sys/fs/cgroup/init, controllers delegated, so the inner
    dockerd (root, cgroupfs driver) enforces an inner --memory. Run by hand with the flags
    security.host_config("hardened") gives, not through the gateway (one gateway port)."""
    name = f"dgwvm-hardened-{secrets.token_hex(3)}"
    flags = ("--init --cgroupns=private --cap-add SYS_ADMIN --cap-add NET_ADMIN "
             "--security-opt seccomp=unconfined --security-opt apparmor=unconfined "
             "--security-opt systempaths=unconfined -e DGW_USER=alice -e DGW_PROFILE=hardened "
             f"-v {name}:/var/lib/docker")
    guest.run(f"docker run -d --name {name} {flags} {guest.image}")
    try:
        ok = wait_for(lambda: guest.run(f"docker exec {name} docker info >/dev/null 2>&1 && "
                                        "echo up", check=False).strip() == "up",
                      scaled(12), interval=2)
        assert ok, guest.run(f"docker logs --tail 30 {name} 2>&1", check=False)
        out = guest.run(f"docker exec {name} sh -c 'cat /sys/fs/cgroup/cgroup.subtree_control; "
                        "cat /sys/fs/cgroup/init/cgroup.procs | wc -l; "
                        "cat /sys/fs/cgroup/cgroup.procs | wc -l'")
        controllers, in_init, in_root = out.splitlines()
        assert {"memory", "pids", "cpu"} <= set(controllers.split()), out
        assert int(in_init) >= 1 and int(in_root) == 0, out
        script = (f"cd / && {PROBE_IMAGE} && docker run --rm -m 64m --pids-limit 50 probe "
                  "/usr/bin/cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max\n")
        out = guest.run(f"docker exec -i {name} sh", input=script.encode(), timeout=scaled(120))
        assert out.split() == ["67108864", "50"], out
    finally:
        guest.run(f"docker rm -f {name}; docker volume rm {name}", check=False)


# ------------------------------------------------------------- the escape suite's probes


def test_no_root_for_the_user(vmgw: VMGateway) -> None:
    code, out = run(vmgw, "id -u; grep -E '^Cap(Eff|Prm)' /proc/self/status")
    # her own host uid (gateway/backend/docker/uids.py), never root, never the shared 1000
    assert code == 0 and 40000 <= int(out.split()[0]) <= 59999, out
    assert re.findall(r"Cap(?:Eff|Prm):\s+(\w+)", out) == ["0000000000000000"] * 2, out
    code, out = run(vmgw, "sudo -n true")
    assert code != 0, out
    code, out = run(vmgw, "find / -xdev -type f -perm /6000 2>/dev/null")
    assert out.strip() == "", f"setuid/setgid binaries: {out}"


@pytest.mark.parametrize("via", ["user", "userns-root", "inner-sysadmin"])
def test_guest_sysctls_stay_closed(vmgw: VMGateway, via: str) -> None:
    path = "/proc/sys/kernel/core_pattern"
    before = vmgw.guest.run(f"cat {path}")
    write = REWRITE.format(p=path)
    command = {
        "user": write,
        "userns-root": f"unshare -r sh -c '{write}'",
        "inner-sysadmin": f"docker run --rm --cap-add SYS_ADMIN probe /usr/bin/dash -c '{write}'",
    }[via]
    if via == "inner-sysadmin":  # (imported by the first-login test when run in order)
        assert run(vmgw, f"docker image inspect probe >/dev/null 2>&1 || ({PROBE_IMAGE})",
                   timeout=scaled(120))[0] == 0
    code, out = run(vmgw, f"{command}; echo rc=$?", timeout=scaled(90))
    assert "rc=0" not in out, out
    assert re.search(r"Permission denied|Read-only file system|Operation not permitted", out), out
    assert vmgw.guest.run(f"cat {path}") == before


def test_mknod_and_mount_of_the_guest_disk(vmgw: VMGateway) -> None:
    major, minor = vmgw.guest.run("mountpoint -d /").strip().split(":")
    for prefix in ("", "unshare -r "):
        code, out = run(vmgw, f"{prefix}mknod /tmp/hostdisk b {major} {minor}; echo rc=$?")
        assert "rc=0" not in out, out
    code, out = run(vmgw, "unshare -r --mount sh -c 'mount -o ro -t ext4 /dev/vda /mnt'; "
                          "echo rc=$?")
    assert "rc=0" not in out, out


def test_her_daemon_is_not_the_guest_engine(vmgw: VMGateway) -> None:
    engine = vmgw.guest.run("docker info -f '{{.ID}}'").strip()
    code, out = run(vmgw, "docker info -f '{{.ID}}'; docker run --rm -v /:/host probe "
                          "/usr/bin/cat /host/etc/hostname", timeout=scaled(90))
    assert code == 0 and engine not in out and "alice-devbox" in out, out


def test_fork_bomb_stays_under_her_pids_cap(vmgw: VMGateway) -> None:
    code, out = run(vmgw, "python3 -c '\n"
                          "import os, time\n"
                          "n = 0\n"
                          "try:\n"
                          "    for _ in range(2000):\n"
                          "        if os.fork() == 0:\n"
                          "            time.sleep(60); os._exit(0)\n"
                          "        n += 1\n"
                          "except OSError as e:\n"
                          "    print(\"stopped\", n, e.errno)\n"
                          "'; pkill -u alice -f 'python3 -c' ; true", timeout=scaled(120))
    m = re.search(r"stopped (\d+) 11", out)
    assert m and int(m.group(1)) < 300, out
    assert wait_for(lambda: run(vmgw, "echo still-here") == (0, "still-here\n"), scaled(10),
                    interval=1)


def test_gateway_log_has_no_apparmor_denials(vmgw: VMGateway) -> None:
    """The kernel logs every AppArmor denial; none may come from her container's processes
    under the profile the gateway chose (a denial would mean a feature silently broken)."""
    out = vmgw.guest.run("dmesg | grep -i 'apparmor=\"DENIED\"' || true")
    print(out)
    assert "rootlesskit" not in out and "dockerd" not in out, out

