"""Per-user environments: the backend contract and its Docker implementation.

The contract is deliberately small (ensure / stop / inspect / exec, plus update and purge), in the
spirit of JupyterHub's Spawner, so that another backend (Kubernetes) can follow.  Every operation
is idempotent: "already running", "already stopped" and "already gone" count as success.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .aio import background
from .disks import DiskError, Disks
from .dockerapi import DockerClient, DockerError, ExecStream
from .events import Events
from .prestart import Spares, encode_header
from .uids import LEGACY, Ids, UidError, UidMap, container_ids

log = logging.getLogger("dind_gateway.backend")

LABEL_MANAGED = "dind-gateway.managed"
LABEL_INSTANCE = "dind-gateway.instance"
LABEL_OWNER = "dind-gateway.owner"
LABEL_ROLE = "dind-gateway.role"

INNER_DOCKER_HOST = "unix:///var/run/docker.sock"
PROFILES = ("rootless", "hardened", "privileged", "sysbox")
# Profiles under which the user holds root-equivalent power over the host (docs/security.md).
ROOT_EQUIVALENT = ("hardened", "privileged")
# What the rootless profile's init still needs as root before it drops to the user: chown of
# her home, volume and tun device, setuid/setgid to become her, and kill for tini (root) to
# pass `docker stop`'s signal to her daemon.  Everything else of Docker's default set goes.
ROOTLESS_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "KILL"]
TMP_DEFAULT = 1 << 30  # /tmp size when memory is unlimited (tmpfs counts against memory)


class BackendError(Exception):
    """An environment could not be provided.  `user_message` is safe to show the user."""

    def __init__(self, user_message: str, log_message: str | None = None,
                 reason: str = "error") -> None:
        super().__init__(log_message or user_message)
        self.user_message = user_message
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Resource caps for one environment; None means unlimited."""

    cpus: float | None = None
    memory: int | None = None
    pids: int | None = None
    disk: int | None = None


@dataclass
class EnvState:
    """What `inspect` reports about one user's environment."""

    user: str
    exists: bool
    running: bool = False
    container_id: str = ""
    started_at: str = ""
    ip: str = ""
    status: str = "missing"
    limits: Limits = field(default_factory=Limits)


class ExecProcess:
    """A process started in an environment: its byte stream plus resize / wait / signal."""

    def __init__(self, backend: DockerBackend, exec_id: str, stream: ExecStream) -> None:
        self._backend = backend
        self.exec_id = exec_id
        self.stream = stream
        self.on_exit: Callable[[], object] | None = None

    async def resize(self, rows: int, cols: int) -> None:
        try:
            await self._backend.docker.exec_resize(self.exec_id, rows, cols)
        except DockerError as exc:  # the process may have just exited
            log.debug("resize of exec %s failed: %s", self.exec_id[:12], exc)

    async def wait(self, poll: float = 0.02, timeout: float = 10.0) -> int:
        """Exit code once the engine reports the process gone (after the stream ended)."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self._backend.docker.exec_inspect(self.exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                if self.on_exit is not None:
                    self.on_exit()
                return int(info["ExitCode"])
            if time.monotonic() > deadline:
                return 255
            await asyncio.sleep(poll)
            poll = min(poll * 2, 0.2)


class Backend(abc.ABC):
    """What the session layer needs from a container platform."""

    @abc.abstractmethod
    async def ensure(self, user: str, limits: Limits,
                     progress: Callable[[str], None] | None = None) -> EnvState:
        """Make the user's environment exist, run and be ready; create/start only if needed."""

    @abc.abstractmethod
    async def stop(self, user: str) -> None:
        """Stop the environment, keeping its data.  Missing or stopped is fine."""

    @abc.abstractmethod
    async def inspect(self, user: str) -> EnvState:
        """Current state; `exists=False` when there is nothing."""

    @abc.abstractmethod
    async def exec(self, user: str, argv: list[str], *, tty: bool, env: dict[str, str],
                   run_as: str, workdir: str) -> ExecProcess:
        """Start a process inside a running environment with a live byte stream."""

    @abc.abstractmethod
    async def list_environments(self) -> list[EnvState]:
        """Every environment this gateway instance owns, running or not."""

    @abc.abstractmethod
    async def has_workloads(self, user: str) -> bool:
        """Whether the user's inner daemon is running containers (activity for culling)."""

    @abc.abstractmethod
    def lock(self, user: str) -> asyncio.Lock:
        """The lock that serialises lifecycle changes of one user's environment."""

    async def run(self, user: str, argv: list[str]) -> tuple[int, bytes]:
        """Run a short housekeeping command *as the user* (never root: the container is hers,
        and nothing the gateway runs there as root may read anything she controls)."""
        proc = await self.exec(user, argv, tty=False, env={}, run_as=user, workdir="/")
        out = []
        try:
            while True:
                stream, data = await proc.stream.read()
                if not stream:
                    break
                if stream == 1:
                    out.append(data)
        finally:
            proc.stream.close()
        return await proc.wait(), b"".join(out)

    @abc.abstractmethod
    async def update_limits(self, user: str, limits: Limits) -> None:
        """Apply new caps to a running environment without restarting it."""

    @abc.abstractmethod
    async def purge(self, user: str) -> None:
        """Delete the environment and all its data (container, network, volumes)."""


class DockerBackend(Backend):
    """One DinD container per user, with named volumes and a private bridge network."""

    def __init__(self, docker: DockerClient, *, image: str, prefix: str,
                 profile: str = "rootless", ready_timeout: float = 60.0,
                 events: Events | None = None,
                 network_pool: str = "10.213.0.0/16", subnet_prefix: int = 28,
                 prestart: bool = True, disks_dir: Path | None = None,
                 uids_file: Path | None = None) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown security profile {profile!r}")
        self.docker = docker
        self.image = image
        self.prefix = prefix
        self.profile = profile
        self.ready_timeout = ready_timeout
        self.events = events or Events()
        # Docker's default address pools hold ~30 bridge networks; a busy server has more
        # users than that, so each user network gets a small subnet from our own pool.
        self.network_pool = ipaddress.IPv4Network(network_pool)
        self.subnet_prefix = subnet_prefix
        self.spares = Spares(self) if prestart else None
        self.disks = Disks(disks_dir) if disks_dir is not None else None
        # each user's own host uid and subordinate range (gateway/uids.py); without a file,
        # everybody is uid 1000 as before (only for backends that make no environment)
        self.uids = UidMap(uids_file) if uids_file is not None else None
        self._locks: dict[str, asyncio.Lock] = {}
        # container id + start time that we have seen ready: lets a warm login skip the ping.
        self._ready: dict[str, tuple[str, str]] = {}

    # --- names ----------------------------------------------------------------------------

    def container_name(self, user: str) -> str:
        return f"{self.prefix}-{user}"

    def network_name(self, user: str) -> str:
        return f"{self.prefix}-{user}"

    def volume_names(self, user: str) -> dict[str, str]:
        return {"home": f"{self.prefix}-{user}-home", "docker": f"{self.prefix}-{user}-docker"}

    def labels(self, user: str, **extra: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.prefix, LABEL_OWNER: user, **extra}

    # --- contract ---------------------------------------------------------------------------

    async def inspect(self, user: str) -> EnvState:
        return self._state(user, await self.docker.inspect_container(self.container_name(user)))

    def lock(self, user: str) -> asyncio.Lock:
        return self._locks.setdefault(user, asyncio.Lock())

    async def list_environments(self) -> list[EnvState]:
        found = await self.docker.request("GET", "/containers/json", query={
            "all": 1, "filters": json.dumps({"label": [f"{LABEL_INSTANCE}={self.prefix}"]})})
        out = []
        for c in found:
            user = (c.get("Labels") or {}).get(LABEL_OWNER)
            if user and f"/{self.container_name(user)}" in c.get("Names", []):
                out.append(EnvState(user=user, exists=True, running=c.get("State") == "running",
                                    container_id=c["Id"], status=c.get("State", "")))
        return out

    async def has_workloads(self, user: str) -> bool:
        code, out = await self.run(user, ["sh", "-c", "DOCKER_HOST=" + INNER_DOCKER_HOST +
                                          " timeout 10 docker ps -q | head -1"])
        return code == 0 and bool(out.strip())

    async def ensure(self, user: str, limits: Limits,
                     progress: Callable[[str], None] | None = None) -> EnvState:
        async with self.lock(user):
            state = await self.inspect(user)
            if state.running and self._ready.get(user) == (state.container_id, state.started_at):
                return state
            t0 = time.monotonic()
            announce = progress if not state.running else None
            if announce:
                announce("Starting your Docker environment…")
            if state.exists and not state.running and await self._made_with_other_ids(user):
                state = EnvState(user=user, exists=False)
            if not state.exists:
                await self._create(user, limits)
                self.events.emit("container.create", user=user,
                                 container=self.container_name(user))
            if not state.running:
                await self._mount_disk(user, limits)
                await self._start(user)
            state = await self._wait_ready(user)
            self._ready[user] = (state.container_id, state.started_at)
            elapsed = time.monotonic() - t0
            log.info("environment of %s ready in %.2f s (container %s)", user, elapsed,
                     state.container_id[:12])
            self.events.emit("container.start", user=user, container=self.container_name(user),
                             duration=round(elapsed, 3), adopted=announce is None)
            if announce:
                announce(f" ready in {elapsed:.1f} s\n")
            return state

    def _forget(self, user: str) -> None:
        self._ready.pop(user, None)
        if self.spares is not None:
            self.spares.drop(user)

    async def stop(self, user: str) -> None:
        self._forget(user)
        t0 = time.monotonic()
        try:
            # 20 s: the inner dockerd itself waits 10 s for its containers to stop.
            await self.docker.request("POST", f"/containers/{self.container_name(user)}/stop",
                                      query={"t": 20}, ok=(204, 304), timeout=60)
        except DockerError as exc:
            if exc.status != 404:
                raise
            return
        self.events.emit("container.stop", user=user, container=self.container_name(user),
                         duration=round(time.monotonic() - t0, 3))

    async def exec(self, user: str, argv: list[str], *, tty: bool, env: dict[str, str],
                   run_as: str, workdir: str) -> ExecProcess:
        name = self.container_name(user)
        if self.spares is not None and self.spares.usable(user, tty, run_as, workdir):
            spare = await self.spares.take(user)
            if spare is not None:
                exec_id, stream = spare
                stream.write(encode_header(argv, env))
                proc = ExecProcess(self, exec_id, stream)
            else:
                proc = await self._fresh_exec(name, argv, tty, env, run_as, workdir)
            # the next session's spare starts once this one is over, not competing with it
            proc.on_exit = lambda: background(self.spares.replenish(user))
            return proc
        return await self._fresh_exec(name, argv, tty, env, run_as, workdir)

    async def _fresh_exec(self, name: str, argv: list[str], tty: bool, env: dict[str, str],
                          run_as: str, workdir: str) -> ExecProcess:
        exec_id = await self.docker.exec_create(
            name, argv, tty=tty, user=run_as, workdir=workdir,
            env=[f"{k}={v}" for k, v in env.items()])
        stream = await self.docker.exec_start(exec_id, tty)
        return ExecProcess(self, exec_id, stream)

    async def update_limits(self, user: str, limits: Limits) -> None:
        """docker update for cpus/memory/pids; a larger `disk` grows the quota online."""
        name = self.container_name(user)
        if limits.disk is not None and self.disks is not None and self.disks.mounted(name):
            try:
                await self.disks.resize(name, limits.disk)
            except DiskError as exc:
                raise BackendError(str(exc), reason="disk-resize") from exc
        try:
            await self.docker.request("POST", f"/containers/{self.container_name(user)}/update",
                                      body=self._limit_spec(limits))
        except DockerError as exc:
            if exc.status != 404:
                raise

    async def purge(self, user: str) -> None:
        self._forget(user)
        await self._ignore_missing("DELETE", f"/containers/{self.container_name(user)}",
                                   query={"force": 1, "v": 0})
        await self._ignore_missing("DELETE", f"/networks/{self.network_name(user)}")
        for vol in self.volume_names(user).values():
            await self._ignore_missing("DELETE", f"/volumes/{vol}")
        if self.disks is not None and self.disks.exists(self.container_name(user)):
            await self.disks.remove(self.container_name(user))

    def disk_usage(self, user: str) -> tuple[int, int] | None:
        """(used, quota) bytes of the user's disk, or None without a mounted quota."""
        name = self.container_name(user)
        if self.disks is None or not self.disks.mounted(name):
            return None
        return self.disks.used(name), self.disks.size(name)

    async def _mount_disk(self, user: str, limits: Limits) -> None:
        """Mount the user's quota disk before her container starts (after a host reboot too)."""
        name = self.container_name(user)
        if self.disks is None or not (limits.disk or self.disks.exists(name)):
            return
        try:
            await self.disks.ensure(name, limits.disk or 0)  # grows, never shrinks
        except DiskError as exc:
            raise BackendError("Your disk could not be prepared; please tell your admin.",
                               f"disk of {user}: {exc}", "disk") from exc

    async def ids(self, user: str) -> Ids:
        """The user's host uid and subordinate range (allocated at her first call)."""
        if self.uids is None or self.profile == "sysbox":
            # sysbox-runc gives each container its own host range already, and maps only
            # 0..65535 inside it: a uid of 2000000 would not exist there (not verified here)
            return LEGACY
        try:
            return await asyncio.to_thread(self.uids.get, user)
        except (UidError, OSError) as exc:
            raise BackendError("Your user id could not be allocated; please tell your admin.",
                               f"uid of {user}: {exc}", "uids") from exc

    async def _made_with_other_ids(self, user: str) -> bool:
        """A stopped rootless container made with other ids (the previous version's uid 1000)
        is removed, its volumes kept, to be made again with hers; dind-init then moves her
        files over.  Nothing of hers is lost: under rootless she can write nothing on the
        container's root filesystem.  (Other profiles keep their container and its ids.)"""
        if self.profile != "rootless":
            return False
        name = self.container_name(user)
        info = await self.docker.inspect_container(name)
        if info is None:
            return False
        had, want = container_ids(info), await self.ids(user)
        if had == want:
            return False
        log.info("container %s was made with uid %d, subids %d; %s now has uid %d, subids %d:"
                 " making it again (volumes kept)", name, had.uid, had.sub, user, want.uid,
                 want.sub)
        await self._ignore_missing("DELETE", f"/containers/{name}", query={"force": 1, "v": 0})
        return True

    # --- primitives ---------------------------------------------------------------------------

    async def _ignore_missing(self, method: str, path: str, **kw: Any) -> None:
        try:
            await self.docker.request(method, path, **kw)
        except DockerError as exc:
            if exc.status != 404:
                raise

    @staticmethod
    def _limit_spec(limits: Limits) -> dict[str, Any]:
        mem = limits.memory or 0
        return {
            "Memory": mem,
            # swap equal to memory: no swapping past the cap; -1 would allow unlimited swap.
            "MemorySwap": mem if mem else -1,
            "NanoCpus": int((limits.cpus or 0) * 1e9),
            "PidsLimit": limits.pids or -1,
        }

    def _security(self, limits: Limits) -> dict[str, Any]:
        if self.profile == "rootless":
            # docs/security.md says why each of these is needed and what it does not open.
            tmp = f"exec,size={limits.memory or TMP_DEFAULT}"
            opts = [f"seccomp={rootless_seccomp()}"]
            if apparmor_enabled():
                # docker-default forbids mount(2), which rootlesskit needs in its own user
                # namespace (not verified here: this host has no AppArmor).
                opts.append("apparmor=unconfined")
            return {
                "CgroupnsMode": "private",
                "CapDrop": ["ALL"],
                "CapAdd": ROOTLESS_CAPS,
                "SecurityOpt": opts,
                # an unmasked /proc: the kernel lets a user namespace mount a new proc only
                # where the existing one is fully visible (inner containers need that)
                "MaskedPaths": [],
                "ReadonlyPaths": [],
                "Devices": [{"PathOnHost": "/dev/net/tun", "PathInContainer": "/dev/net/tun",
                             "CgroupPermissions": "rwm"}],
                # the user can write nowhere on the container's root filesystem; what she
                # may write outside her volumes is in memory, under her memory cap
                "Tmpfs": {"/run": "exec,size=64m", "/tmp": tmp, "/var/tmp": tmp},
            }
        if self.profile == "privileged":
            return {"Privileged": True, "CgroupnsMode": "private"}
        if self.profile == "sysbox":
            return {"Runtime": "sysbox-runc"}
        # hardened: the least that runs dockerd here (shared/notes/dind-here.md).  The CLI's
        # `systempaths=unconfined` is client-side sugar for empty Masked/ReadonlyPaths.
        return {
            "CgroupnsMode": "private",
            "CapAdd": ["SYS_ADMIN", "NET_ADMIN"],
            "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
            "MaskedPaths": [],
            "ReadonlyPaths": [],
        }

    async def _create(self, user: str, limits: Limits) -> None:
        net = self.network_name(user)
        vols = self.volume_names(user)
        # ensure() mounts the disk (and makes home/ and docker/ on it) before the first start
        disk = None
        if limits.disk and self.disks is not None:
            disk = self.disks.mountpoint(self.container_name(user))
        for role, vol in vols.items():
            body: dict[str, Any] = {"Name": vol, "Labels": self.labels(user, **{
                LABEL_ROLE: role})}
            if disk is not None:  # the local driver bind-mounts a directory of the quota disk
                body["DriverOpts"] = {"type": "none", "o": "bind",
                                      "device": os.fspath(disk / role)}
            await self.docker.request("POST", "/volumes/create", body=body)
        await self._create_network(user)
        spec = {
            "Image": self.image,
            "Hostname": f"{user}-devbox",
            "Env": [f"DGW_USER={user}", *(await self.ids(user)).env(),
                    f"DGW_PROFILE={self.profile}"],
            "Labels": self.labels(user),
            "HostConfig": {
                "Init": True,
                "NetworkMode": net,
                "Mounts": [
                    {"Type": "volume", "Source": vols["home"], "Target": f"/home/{user}"},
                    {"Type": "volume", "Source": vols["docker"], "Target": "/var/lib/docker"},
                ],
                **self._limit_spec(limits),
                **self._security(limits),
            },
        }
        try:
            await self.docker.request("POST", "/containers/create",
                                      query={"name": self.container_name(user)}, body=spec)
            log.info("created container %s", self.container_name(user))
        except DockerError as exc:
            if exc.status == 409:  # another gateway process won the race: use theirs
                return
            if exc.status == 404:
                raise BackendError(
                    "The development image is missing on the server; please tell your admin.",
                    f"image {self.image} not found: {exc.message}", "image-missing") from exc
            raise

    async def _create_network(self, user: str) -> None:
        """The user's bridge network on the first free subnet of the pool (idempotent)."""
        name = self.network_name(user)
        networks = await self.docker.request("GET", "/networks")
        if any(n.get("Name") == name for n in networks):
            return
        used = [ipaddress.ip_network(c["Subnet"], strict=False) for n in networks
                for c in (n.get("IPAM") or {}).get("Config") or [] if c.get("Subnet")]
        for subnet in self.network_pool.subnets(new_prefix=self.subnet_prefix):
            if any(subnet.overlaps(u) for u in used):
                continue
            try:
                await self.docker.request("POST", "/networks/create", body={
                    "Name": name, "Driver": "bridge", "CheckDuplicate": True,
                    "IPAM": {"Config": [{"Subnet": str(subnet)}]},
                    "Labels": self.labels(user)})
                return
            except DockerError as exc:
                if exc.status == 409:  # created meanwhile by another gateway process
                    return
                if "overlap" not in exc.message.lower():
                    raise
                used.append(subnet)  # taken by a concurrent create: try the next one
        raise BackendError("No network could be set up for your environment; please tell "
                           "your admin.", f"user_network_pool {self.network_pool} is full",
                           "network-pool-full")

    async def _start(self, user: str) -> None:
        try:
            await self.docker.request("POST", f"/containers/{self.container_name(user)}/start",
                                      ok=(204, 304))
        except DockerError as exc:
            raise BackendError(f"Your environment failed to start: {exc.message}",
                               reason="start-failed") from exc

    async def _wait_ready(self, user: str) -> EnvState:
        """Wait until the inner dockerd answers /_ping; fail fast if the container dies."""
        name = self.container_name(user)
        deadline = time.monotonic() + self.ready_timeout
        probe = ["sh", "-c", "curl -sf --max-time 2 --unix-socket /var/run/docker.sock "
                 "http://docker/_ping >/dev/null 2>&1 || exit 1"]
        delay = 0.05
        while True:
            state = await self.inspect(user)
            if not state.exists or not state.running:
                tail = await self._tail(name)
                raise BackendError(
                    f"Your environment stopped while starting. Last daemon log lines:\n{tail}",
                    f"container {name} exited during start ({state.status})", "crashed")
            try:
                if (await self.run(user, probe))[0] == 0:
                    return state
            except DockerError as exc:
                log.debug("readiness probe of %s: %s", name, exc)
            if time.monotonic() > deadline:
                tail = await self._tail(name)
                raise BackendError(
                    f"Your Docker daemon did not become ready within {self.ready_timeout:.0f} s."
                    f" Last daemon log lines:\n{tail}",
                    f"inner dockerd of {name} not ready after {self.ready_timeout} s", "timeout")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def _tail(self, name: str) -> str:
        try:
            return (await self.docker.logs_tail(name, 15)).rstrip() or "(no output)"
        except DockerError as exc:
            return f"(logs unavailable: {exc.message})"

    def _state(self, user: str, info: dict[str, Any] | None) -> EnvState:
        if info is None:
            return EnvState(user=user, exists=False)
        st = info.get("State", {})
        hc = info.get("HostConfig", {})
        nets = info.get("NetworkSettings", {}).get("Networks", {}) or {}
        ip = next((n.get("IPAddress", "") for n in nets.values() if n.get("IPAddress")), "")
        return EnvState(
            user=user, exists=True, running=bool(st.get("Running")), container_id=info["Id"],
            started_at=st.get("StartedAt", ""), ip=ip, status=st.get("Status", "unknown"),
            limits=Limits(cpus=(hc.get("NanoCpus") or 0) / 1e9 or None,
                          memory=hc.get("Memory") or None,
                          pids=hc.get("PidsLimit") if (hc.get("PidsLimit") or 0) > 0 else None))


@functools.cache
def rootless_seccomp() -> str:
    """The rootless profile's seccomp filter as JSON (scripts/seccomp-rootless.py made it)."""
    text = resources.files("gateway").joinpath("profiles/seccomp-rootless.json").read_text()
    return json.dumps(json.loads(text), separators=(",", ":"))  # compact, as the CLI sends it


def apparmor_enabled() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False
