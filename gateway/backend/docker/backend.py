"""The Docker backend: one DinD container per user, her volumes and a private bridge network.

Everything that knows Docker lives in this package: the engine client (`engine`), container
lifecycle and naming (here), security profiles (`security`), disk quotas (`disks`), the exec
wrapper and signal delivery (`process`) and pre-started execs (`spares`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ...aio import background
from ...errors import os_reason
from ...observe.events import Events
from ..base import (
    Backend,
    BackendError,
    EnvState,
    EnvStats,
    Limits,
    ProcessSpec,
    Share,
    SocketListener,
    collect,
)
from .direct import DirectExec, DirectProcess, Identity, merge_env
from .disks import DiskError, Disks, share_permissions
from .engine import DockerClient, DockerError, EngineUnreachable
from .launcher import Launcher
from .process import HANGUP_GRACE, KILLER, LIVE, REAPER, DockerProcess, exec_argv
from .registry import Mirror, RegistryOptions, preload
from .security import PROFILES, host_config, limit_spec
from .sockets import NamespaceSockets, bind_listen, unix_connect, unix_listener
from .spares import PTY_SPARE_ARGV, SPARE_ARGV, Spares, encode_header
from .uids import LEGACY, Ids, UidError, UidMap, container_ids

log = logging.getLogger("dind_gateway.backend")

LABEL_MANAGED = "dind-gateway.managed"
LABEL_INSTANCE = "dind-gateway.instance"
LABEL_OWNER = "dind-gateway.owner"
LABEL_ROLE = "dind-gateway.role"
LABEL_GROUP = "dind-gateway.group"
LABEL_SHARES = "dind-gateway.shares"  # the group volumes a container was made with

INNER_DOCKER_HOST = "unix:///var/run/docker.sock"
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


class DockerBackend(Backend):
    """One DinD container per user, with named volumes and a private bridge network."""

    def __init__(self, docker: DockerClient, *, image: str, prefix: str,
                 profile: str = "rootless", ready_timeout: float = 60.0,
                 events: Events | None = None,
                 network_pool: str = "10.213.0.0/16", subnet_prefix: int = 28,
                 prestart: bool = True, disks_dir: Path | None = None,
                 uids_file: Path | None = None,
                 registry: RegistryOptions | None = None,
                 direct: DirectExec | None = None) -> None:
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
        # the direct process path (direct.py): runc next to the engine, no relay by dockerd.
        # Spares hide the engine's exec start-up (~45 ms); the direct path has its own
        # (`_direct_spares`: a shell started through runc, waiting for its header; one for
        # terminal sessions, one for the others).
        self.direct = direct
        self.spares = Spares(docker, self.container_name) if prestart and not direct else None
        self._who: dict[str, tuple[tuple[str, str], Identity, dict[str, Any]]] = {}
        self._who_locks: dict[str, asyncio.Lock] = {}
        # pre-started direct processes (as spares.py, through runc): at most one per user and
        # kind, terminal or not, each made after a session of that kind (see `start`)
        self._direct_spares: dict[tuple[str, bool], tuple[tuple[str, str], DirectProcess]] = {}
        # her session launcher (launcher.py), and the container start each launch attempt
        # was for (one attempt per container start: without python3 it is runc throughout)
        self._launchers: dict[str, Launcher] = {}
        self._launch_tried: dict[str, tuple[str, str]] = {}
        self.disks = Disks(disks_dir) if disks_dir is not None else None
        # each user's own host uid and subordinate range (uids.py); without a file,
        # everybody is uid 1000 as before (only for backends that make no environment)
        self.uids = UidMap(uids_file) if uids_file is not None else None
        self._locks: dict[str, asyncio.Lock] = {}
        # container id + start time that we have seen ready: lets a warm login skip the ping.
        self._ready: dict[str, tuple[str, str]] = {}
        self._df_cache: tuple[float, dict[str, int]] | None = None
        self.netns = NamespaceSockets()
        self._share_locks: dict[str, asyncio.Lock] = {}
        # registry mirror and preloaded images (registry.py)
        self.registry = registry or RegistryOptions()
        self.mirror = Mirror(docker, self.registry)

    @property
    def outage_hint(self) -> str:  # type: ignore[override]
        return (f"start the Docker engine (dockerd), or set docker_host in gateway.yaml to "
                f"the socket it listens on (now unix://{self.docker.path})")

    # --- names ----------------------------------------------------------------------------

    def container_name(self, user: str) -> str:
        return f"{self.prefix}-{user}"

    def network_name(self, user: str) -> str:
        return f"{self.prefix}-{user}"

    def volume_names(self, user: str) -> dict[str, str]:
        return {"home": f"{self.prefix}-{user}-home", "docker": f"{self.prefix}-{user}-docker"}

    def labels(self, user: str, **extra: str) -> dict[str, str]:
        return {LABEL_MANAGED: "true", LABEL_INSTANCE: self.prefix, LABEL_OWNER: user, **extra}

    def share_name(self, share: Share) -> str:
        """Volume and disk of a group's shared volume (a dot: never a user's name)."""
        return f"{self.prefix}.{share.group}.{share.name}"

    def image_of(self, limits: Limits) -> str:
        return limits.image or self.image

    def _shares_label(self, limits: Limits) -> str:
        return ",".join(f"{self.share_name(s)}:{s.path}:{'ro' if s.read_only else 'rw'}"
                        for s in limits.shares)

    # --- contract ---------------------------------------------------------------------------

    async def inspect(self, user: str) -> EnvState:
        return self._state(user, await self.docker.inspect_container(self.container_name(user)))

    def _lock(self, user: str) -> asyncio.Lock:
        """Serialises lifecycle changes of one user's environment (not part of the contract:
        callers say what must hold with `stop(unless=...)`)."""
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
        try:
            return await self._ensure(user, limits, progress)
        except BackendError as exc:  # counted as dgw_spawn_failures_total{reason}
            self.events.emit("container.failure", user=user,
                             container=self.container_name(user), reason=exc.reason)
            raise

    async def _ensure(self, user: str, limits: Limits,
                      progress: Callable[[str], None] | None = None) -> EnvState:
        async with self._lock(user):
            state = await self.inspect(user)
            if state.running and self._ready.get(user) == (state.container_id, state.started_at):
                return state
            t0 = time.monotonic()
            announce = progress if not state.running else None
            if announce:
                announce("Starting your Docker environment…")
            if state.exists and not state.running and (
                    await self._made_with_other_ids(user)
                    or await self._replace_outdated(user, limits)):
                state = EnvState(user=user, exists=False)
            created = not state.exists
            if created:
                await self._create(user, limits)
                self.events.emit("container.create", user=user,
                                 container=self.container_name(user))
            if not state.running:
                await self._mount_disk(user, limits)
                await self._prepare_shares(user, limits)
                await self._start(user)
            state = await self._wait_ready(user)
            self._ready[user] = (state.container_id, state.started_at)
            self._ready_now(user, self.container_name(user), state, t0, announce)
            if created and self.registry.preload:
                await preload(self.docker, self.container_name(user), user,
                              self.registry.preload, self.run, announce)
            return state

    def _forget(self, user: str) -> None:
        self._ready.pop(user, None)
        self._who.pop(user, None)
        launcher = self._launchers.pop(user, None)
        if launcher is not None:
            launcher.close()
        for tty in (False, True):
            spare = self._direct_spares.pop((user, tty), None)
            if spare is not None:
                spare[1].close()
        if self.spares is not None:
            self.spares.drop(user)

    async def stop(self, user: str, *, unless: Callable[[], bool] | None = None) -> bool:
        async with self._lock(user):
            if unless is not None and unless():
                return False
            self._forget(user)
            t0 = time.monotonic()
            try:
                # 20 s: the inner dockerd itself waits 10 s for its containers to stop.
                await self.docker.request(
                    "POST", f"/containers/{self.container_name(user)}/stop",
                    query={"t": 20}, ok=(204, 304), timeout=60)
            except DockerError as exc:
                if exc.status != 404:
                    raise
                return False
        self.events.emit("container.stop", user=user, container=self.container_name(user),
                         duration=round(time.monotonic() - t0, 3))
        return True

    async def start(self, spec: ProcessSpec) -> DockerProcess | DirectProcess:
        user = spec.user
        argv, env, pidfile = exec_argv(spec)
        workdir = spec.workdir or f"/home/{user}"
        if self.direct is not None and not spec.tty:
            launched = await self._launch(user, argv, env, workdir, pidfile)
            if launched is not None:
                return launched
        if self.direct is not None:
            # Her next session of the same kind, terminal or not, gets a spare made after
            # this one: an IDE's many non-terminal sessions use one, her interactive logins
            # the other.  A terminal spare takes sessions whose wrapper sets the terminal
            # size (her shell, her command; housekeeping's argv has none).
            usable = workdir == f"/home/{user}" and (not spec.tty or pidfile is not None)
            spare = self._direct_spares.pop((user, spec.tty), None) if usable else None
            if spare is not None and (not spare[1].running
                                      or spare[0] != self._ready.get(user)):
                spare[1].close()
                spare = None
            if spare is not None:  # a pre-started shell of hers: it execs what we tell it
                direct = spare[1]
                direct.begin(encode_header(argv, env), spec.size)
                log.debug("session of %s from a spare (runc %d, %s)", user, direct.pid,
                          "terminal" if spec.tty else "pipes")
                self._direct_session(direct, user, pidfile)
            else:
                direct = await self._start_direct(user, argv, spec.tty, env, workdir,
                                                  pidfile, spec.size)
            if direct is not None:
                if usable:  # the next one's spare starts once this one is over
                    tty = spec.tty
                    direct.on_exit = lambda: background(self._replenish_direct(user, tty))
                return direct
        if self.spares is not None and self.spares.usable(user, spec.tty, workdir):
            spare = await self.spares.take(user)
            if spare is not None:
                exec_id, stream = spare
                stream.write(encode_header(argv, env))
                proc = self._process(exec_id, stream, user, pidfile)
            else:
                proc = await self._fresh_exec(user, argv, spec.tty, env, workdir, pidfile)
            # the next session's spare starts once this one is over, not competing with it
            spares = self.spares
            proc.on_exit = lambda: background(spares.replenish(user))
            return proc
        return await self._fresh_exec(user, argv, spec.tty, env, workdir, pidfile)

    async def _start_direct(self, user: str, argv: list[str], tty: bool, env: dict[str, str],
                            workdir: str, pidfile: str | None, size: tuple[int, int],
                            header: bool = False) -> DirectProcess | None:
        """Her process through runc (direct.py), or None where runc here does not manage her
        container (the engine's exec API is used then)."""
        assert self.direct is not None
        ready = self._ready.get(user)
        if ready is None or not self.direct.knows(ready[0]):
            return None
        try:
            who, base = await self._identity(user, ready)
        except TimeoutError:  # the engine's (an OSError too): not a missing runc state
            raise
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            log.warning("container of %s: no runc state to start from (%r); this session "
                        "goes through the engine", user, exc)
            return None
        try:
            proc = await self.direct.start(ready[0], base, who, argv, env, workdir, tty, size,
                                           header)
        except OSError as exc:
            raise BackendError("your session could not be started; please tell your admin",
                               f"runc exec for {user}: {exc}", "exec-failed") from exc
        return self._direct_session(proc, user, pidfile)

    def _direct_session(self, proc: DirectProcess, user: str,
                        pidfile: str | None) -> DirectProcess:
        proc.gone = lambda: self._gone_reason(user)
        if pidfile is not None:
            proc.kill_leftovers = lambda: self._kill_session(user, pidfile)
        return proc

    async def _launch(self, user: str, argv: list[str], env: dict[str, str], workdir: str,
                      pidfile: str | None) -> DirectProcess | None:
        """Her non-terminal session forked by her launcher (launcher.py); None while she has
        none that answers (the first is started then, in the background)."""
        ready = self._ready.get(user)
        if ready is None or self.direct is None:
            return None
        launcher = self._live_launcher(user, ready)
        if launcher is None:
            if self._launch_tried.get(user) != ready and self.direct.knows(ready[0]):
                self._launch_tried[user] = ready
                background(self._start_launcher(user, ready))
            return None
        _, base = await self._identity(user, ready)
        proc = await launcher.spawn(argv, merge_env(base.get("env") or [], env), workdir)
        if proc is None:
            return None
        log.debug("session of %s forked by her launcher (pid %d)", user, proc.pid)
        return self._direct_session(proc, user, pidfile)

    def _live_launcher(self, user: str, ready: tuple[str, str]) -> Launcher | None:
        """Her launcher if it answers for this very container start (a dead or stale one is
        closed and forgotten)."""
        launcher = self._launchers.get(user)
        if launcher is not None and (launcher.key != ready or not launcher.alive):
            self._launchers.pop(user).close()
            launcher = None
        return launcher

    async def _start_launcher(self, user: str, ready: tuple[str, str]) -> None:
        """Best effort, never raises: without a launcher her sessions start through runc."""
        assert self.direct is not None
        try:
            who, base = await self._identity(user, ready)
            launcher = await Launcher.start(self.direct, ready, user, base, who)
        except Exception as exc:  # noqa: BLE001 - logged; sessions go through runc
            log.warning("no session launcher for %s: %r", user, exc)
            return
        if launcher is None:
            return
        if self._ready.get(user) != ready:
            launcher.close()
            return
        old = self._launchers.pop(user, None)
        if old is not None:
            old.close()
        self._launchers[user] = launcher
        spare = self._direct_spares.pop((user, False), None)  # not needed any more
        if spare is not None:
            spare[1].close()

    async def _replenish_direct(self, user: str, tty: bool) -> None:
        """A spare on the direct path: her shell, started through runc in her home, waiting
        for one header line (spares.py) on stdin, or for a terminal spare on fd 3 — a warm
        session then skips runc's start-up.  A terminal spare starts at 80x24; `begin` gives
        it the session's size.  Best effort, never raises."""
        ready = self._ready.get(user)
        key = (user, tty)
        if key in self._direct_spares or ready is None or self.direct is None:
            return
        if not tty and self._live_launcher(user, ready) is not None:
            return  # her launcher starts these
        argv = PTY_SPARE_ARGV if tty else SPARE_ARGV
        try:
            proc = await self._start_direct(user, list(argv), tty, {}, f"/home/{user}", None,
                                            (80, 24), header=tty)
        except BackendError as exc:
            log.debug("no direct spare for %s: %s", user, exc)
            return
        if proc is None:
            return
        old = self._direct_spares.pop(key, None)
        if old is not None:
            old[1].close()
        if self._ready.get(user) != ready:
            proc.close()
            return
        self._direct_spares[key] = (ready, proc)

    async def _identity(self, user: str,
                        ready: tuple[str, str]) -> tuple[Identity, dict[str, Any]]:
        """uid, gid and groups of `docker exec -u USER` in this very container (asked once
        per container start, of the engine itself: /etc/passwd, /etc/group, GroupAdd), and
        the container's own process spec."""
        known = self._who.get(user)
        if known is not None and known[0] == ready:
            return known[1], known[2]
        async with self._who_locks.setdefault(user, asyncio.Lock()):  # one lookup at a time
            known = self._who.get(user)
            if known is not None and known[0] == ready:
                return known[1], known[2]
            return await self._look_up(user, ready)

    async def _look_up(self, user: str,
                       ready: tuple[str, str]) -> tuple[Identity, dict[str, Any]]:
        assert self.direct is not None
        base = await asyncio.to_thread(self.direct.base_process, ready[0])
        status, out = await collect(await self._fresh_exec(
            user, ["sh", "-c", "id -u; id -g; id -G"], False, {}, "/", None))
        try:
            uid, gid, groups = out.decode().split("\n")[:3]
            who = Identity(int(uid), int(gid), tuple(int(g) for g in groups.split()))
        except ValueError as exc:
            raise BackendError("your account in your container could not be looked up; "
                               "please tell your admin", f"id of {user}: status {status}, "
                               f"{out[:200]!r}", "exec-failed") from exc
        self._who[user] = (ready, who, base)
        return who, base

    async def _kill_session(self, user: str, pidfile: str) -> None:
        """Kill a hung-up session's process and its group, found by its PID file, as her."""
        try:
            await self.run(user, ["sh", "-c", LIVE + f'p=$(live_ {pidfile}) && {{ kill -s '
                                  'KILL -- "-$p"; kill -s KILL "$p"; } 2>/dev/null; true'])
        except BackendError as exc:
            log.debug("leftovers of %s not killed: %s", user, exc)

    def _process(self, exec_id: str, stream: Any, user: str,
                 pidfile: str | None) -> DockerProcess:
        return DockerProcess(self.docker, exec_id, stream, user=user, pidfile=pidfile,
                             runner=self.run, gone=self._gone_reason)

    async def _gone_reason(self, user: str) -> BackendError | None:
        """Why a session's container disappeared under it, in words for her; None while it
        is still running (then the process was only killed by a signal)."""
        info = await self.docker.inspect_container(self.container_name(user))
        state = (info or {}).get("State") or {}
        if info is not None and state.get("Running") and _alive(int(state.get("Pid") or 0)):
            return None
        self._forget(user)
        if state.get("OOMKilled"):
            text = "your container ran out of memory and was stopped"
        else:
            text = f"your container was stopped or removed ({state.get('Status', 'gone')})"
        return BackendError(f"{text}; your files are kept: log in again to start it.",
                            f"container of {user} gone during a session: {text}",
                            "container-gone")

    async def _fresh_exec(self, user: str, argv: list[str], tty: bool, env: dict[str, str],
                          workdir: str, pidfile: str | None) -> DockerProcess:
        exec_id = await self.docker.exec_create(
            self.container_name(user), argv, tty=tty, user=user, workdir=workdir,
            env=[f"{k}={v}" for k, v in env.items()])
        stream = await self.docker.exec_start(exec_id, tty)
        return self._process(exec_id, stream, user, pidfile)

    async def open_connection(self, user: str, port: int) -> socket.socket:
        """To 127.0.0.1:port *inside* her container (netns), so servers bound to her
        loopback are reachable; where the gateway may not enter namespaces (a containerised
        gateway without --pid host), to her container's address instead."""
        state, pid = await self._running(user)
        sock, target = None, (state.ip, port)
        if self.netns.available is not False and pid:
            try:
                sock = await self.netns.tcp_socket(pid, state.container_id)
                self.netns.available, target = True, ("127.0.0.1", port)
            except PermissionError as exc:
                self.netns.available = False
                log.warning("cannot enter container network namespaces (%s): ssh -L reaches "
                            "container addresses only, not their loopback", exc)
            except (ProcessLookupError, FileNotFoundError) as exc:
                raise BackendError("your container is restarting; try again", str(exc),
                                   "not-running") from exc
        if sock is None:
            if not state.ip:
                raise BackendError("your container has no address", f"{user}: no address",
                                   "not-running")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, target)
        except OSError as exc:
            sock.close()
            raise BackendError(f"connection to port {port} failed: {os_reason(exc)}",
                               f"{user}: connect {target[0]}:{port}: {exc}",
                               "connect-failed") from exc
        return sock

    async def _running(self, user: str) -> tuple[EnvState, int]:
        """Her running container's state and init PID (host-side socket operations)."""
        info = await self.docker.inspect_container(self.container_name(user))
        state = self._state(user, info)
        pid = int((info or {}).get("State", {}).get("Pid") or 0)
        if not state.running or not pid:
            raise BackendError("your container is not running", f"{user}: not running",
                               "not-running")
        return state, pid

    async def listen_tcp(self, user: str, port: int) -> SocketListener:
        """A listening socket on 127.0.0.1:port in her container's network namespace."""
        state, pid = await self._running(user)
        try:
            sock = await self.netns.tcp_socket(pid, state.container_id)
        except PermissionError as exc:
            raise BackendError("remote forwarding is not available on this server",
                               f"cannot enter network namespaces: {exc}", "no-netns") from exc
        except (ProcessLookupError, FileNotFoundError) as exc:
            raise BackendError("your container is restarting; try again", str(exc),
                               "not-running") from exc
        return SocketListener(bind_listen(sock, port))

    async def listen_unix(self, user: str, name: str) -> SocketListener:
        """A socket file `name` in a fresh directory under /run/dgw in her container, hers
        alone (a 0700 directory of hers; the socket is hers too).  Made from the host through
        /proc/<pid>/root one directory at a time without following links, below /run, which
        only root may write: nothing she controls can point it elsewhere."""
        state, pid = await self._running(user)
        try:
            return await asyncio.to_thread(unix_listener, pid, state.container_id, user, name)
        except OSError as exc:
            raise BackendError("the socket could not be made in your container",
                               f"{user}: unix listener: {exc}", "unix-listener") from exc

    async def open_unix(self, user: str, path: str) -> socket.socket:
        """Connected to the socket file `path` in her container, if it is hers: looked up
        from the host inside her root only (see sockets.resolve_in_root), checked to be a socket
        owned by her, and connected through the very file checked."""
        state, pid = await self._running(user)
        try:
            return await asyncio.to_thread(unix_connect, pid, state.container_id, user, path)
        except (OSError, ValueError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BackendError(f"cannot connect to {path}: {text}",
                               f"{user}: unix connect {path}: {exc}", "connect-failed") from exc

    def aliases(self, user: str) -> set[str]:
        return _LOCAL_NAMES | {f"{user}-devbox", self.container_name(user), "devbox"}

    def environment(self, user: str) -> dict[str, str]:
        return {"DOCKER_HOST": INNER_DOCKER_HOST}

    async def reap(self, user: str) -> None:
        """Hang up now (before this process takes sessions), kill the rest after the grace."""
        try:
            _, out = await self.run(user, ["sh", "-c", REAPER])
        except BackendError as exc:
            log.warning("could not end the old sessions of %s: %s", user, exc)
            return
        pids = out.decode(errors="replace").split()
        if not pids:
            return
        log.info("hung up %d session(s) of %s left by the previous gateway process",
                 len(pids), user)

        async def kill_rest() -> None:
            await asyncio.sleep(HANGUP_GRACE)
            try:
                await self.run(user, ["sh", "-c", KILLER, "sh", *pids])
            except BackendError as exc:
                log.debug("old sessions of %s: %s", user, exc)

        background(kill_rest())

    async def health(self) -> str:
        t0 = time.monotonic()
        if not await self.docker.ping():
            raise BackendError("the container engine failed", "unexpected answer to /_ping",
                               "engine")
        return f"ok (docker answered in {time.monotonic() - t0:.3f} s)"

    async def close(self) -> None:
        if self.spares is not None:
            self.spares.drop_all()
        if self.direct is not None:
            for key in list(self._direct_spares):
                self._direct_spares.pop(key)[1].close()
        for user in list(self._launchers):
            self._launchers.pop(user).close()
        self.netns.close()

    async def stats(self, user: str) -> EnvStats:
        """State of the container plus two stats samples 0.5 s apart (for CPU %)."""
        out = EnvStats(disk=self.disk_usage(user))
        out.cache_bytes = (await self._volume_sizes()).get(self.volume_names(user)["docker"])
        state = await self.inspect(user)
        if not state.running:
            return out
        try:
            s1 = await self.docker.request("GET", f"/containers/{state.container_id}/stats",
                                           query={"stream": "false", "one-shot": "true"})
            await asyncio.sleep(0.5)
            s2 = await self.docker.request("GET", f"/containers/{state.container_id}/stats",
                                           query={"stream": "false", "one-shot": "true"})
        except DockerError:
            return out
        cpu = s2["cpu_stats"]["cpu_usage"]["total_usage"] - s1["cpu_stats"]["cpu_usage"][
            "total_usage"]
        system = (s2["cpu_stats"].get("system_cpu_usage", 0)
                  - s1["cpu_stats"].get("system_cpu_usage", 0))
        ncpu = s2["cpu_stats"].get("online_cpus") or 1
        mem = s2.get("memory_stats", {})
        out.uptime = _uptime(state.started_at)
        out.cpu_percent = round(100.0 * cpu / system * ncpu, 1) if system > 0 else 0.0
        out.mem_bytes = mem.get("usage", 0) - (mem.get("stats") or {}).get("cache", 0)
        out.mem_limit = state.limits.memory
        out.pids = (s2.get("pids_stats") or {}).get("current", 0)
        return out

    async def _volume_sizes(self) -> dict[str, int]:
        """Sizes of every volume; /system/df is slow, so one call serves a whole `ps`."""
        now = time.monotonic()
        if self._df_cache is not None and now - self._df_cache[0] < 5:
            return self._df_cache[1]
        try:
            df = await self.docker.request("GET", "/system/df", timeout=60)
        except DockerError:
            return {}
        sizes = {v["Name"]: (v.get("UsageData") or {}).get("Size", -1)
                 for v in df.get("Volumes") or []}
        self._df_cache = (now, sizes)
        return sizes

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
                                      body=limit_spec(limits))
        except DockerError as exc:
            if exc.status != 404:
                raise

    async def purge(self, user: str) -> None:
        async with self._lock(user):
            self._forget(user)
            await self._ignore_missing("DELETE", f"/containers/{self.container_name(user)}",
                                       query={"force": 1, "v": 0})
            await self.mirror.detach(self.network_name(user))
            await self._ignore_missing("DELETE", f"/networks/{self.network_name(user)}")
            for vol in self.volume_names(user).values():
                await self._ignore_missing("DELETE", f"/volumes/{vol}")
            if self.disks is not None and self.disks.exists(self.container_name(user)):
                await self.disks.remove(self.container_name(user))
        self.events.emit("container.purge", user=user)

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

    # --- images, group volumes, roll-out --------------------------------------------------

    async def _image_id(self, ref: str) -> str | None:
        """The id the engine has for image `ref` now (a tag moves when rebuilt), or None."""
        try:
            info = await self.docker.request("GET", f"/images/{quote(ref, safe='/:@')}/json")
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise
        return info.get("Id")

    async def check_image(self, ref: str) -> str | None:
        try:
            found = await self._image_id(ref)
        except (DockerError, OSError) as exc:
            raise BackendError("the Docker engine did not answer",
                               f"image {ref}: {exc}", "engine") from exc
        if found is None:
            return (f"image {ref!r} is not on the Docker engine: build, pull or load it first "
                    "(it must run dind-init: build it FROM dind-gateway/dind)")
        return None

    async def outdated(self, user: str, limits: Limits) -> str | None:
        info = await self.docker.inspect_container(self.container_name(user))
        return None if info is None else await self._outdated(info, limits)

    async def _outdated(self, info: dict[str, Any], limits: Limits) -> str | None:
        config = info.get("Config") or {}
        want, have = self.image_of(limits), config.get("Image", "")
        reasons = []
        if have != want:
            reasons.append(f"image setting changed: {have} -> {want}")
        else:
            now = await self._image_id(want)
            if now is not None and now != info.get("Image"):
                reasons.append(f"{want} was rebuilt ({_short(info.get('Image'))} -> "
                               f"{_short(now)})")
        if (config.get("Labels") or {}).get(LABEL_SHARES, "") != self._shares_label(limits):
            reasons.append("group volumes changed")
        return "; ".join(reasons) or None

    async def _replace_outdated(self, user: str, limits: Limits) -> bool:
        """A stopped container that is outdated (image, group volumes) is removed at its next
        start, volumes and network kept, to be made again as configured now (under rootless
        she can write nothing on its root filesystem; under the other profiles what she wrote
        there outside her volumes is lost, as with `upgrade`).  If the image it should now
        run is missing, the old one starts and the log says why."""
        name = self.container_name(user)
        info = await self.docker.inspect_container(name)
        reason = None if info is None else await self._outdated(info, limits)
        if reason is None:
            return False
        want = self.image_of(limits)
        if await self._image_id(want) is None:
            log.warning("container %s is outdated (%s) but image %s is not on the engine: "
                        "starting it as it is", name, reason, want)
            return False
        log.info("container %s is outdated (%s): made again at this start (volumes and "
                 "network kept)", name, reason)
        await self._ignore_missing("DELETE", f"/containers/{name}", query={"force": 1, "v": 0})
        return True

    async def upgrade(self, user: str, limits: Limits, *,
                      unless: Callable[[], bool] | None = None) -> str:
        name = self.container_name(user)
        async with self._lock(user):
            if unless is not None and unless():
                return "in use: not upgraded"
            info = await self.docker.inspect_container(name)
            if info is None:
                return "no container: her next login makes one as configured"
            reason = await self._outdated(info, limits)
            if reason is None:
                return "up to date"
            want = self.image_of(limits)
            if await self._image_id(want) is None:
                raise BackendError(f"image {want} is not on the Docker engine",
                                   reason="image-missing")
            running = bool((info.get("State") or {}).get("Running"))
            self._forget(user)
            try:
                if running:
                    await self.docker.request("POST", f"/containers/{name}/stop",
                                              query={"t": 20}, ok=(204, 304, 404), timeout=60)
                await self._ignore_missing("DELETE", f"/containers/{name}",
                                           query={"force": 1, "v": 0})
                await self._create(user, limits)
            except DockerError as exc:
                raise BackendError(f"the engine refused: {exc.message}",
                                   f"upgrade of {name}: {exc}", "upgrade") from exc
            self.events.emit("container.create", user=user, container=name)
            log.info("container %s made again (%s); volumes and network kept", name, reason)
            if not running:
                return f"made again ({reason}); it starts at her next login"
        await self.ensure(user, limits)
        return f"upgraded ({reason})"

    async def _group_gid(self, group: str) -> int | None:
        """A group's own gid: the uid of a slot of the uid map of its own ("group:NAME", never
        a user name), so disjoint from every user's uid and subordinate ids, and never
        reused."""
        if self.uids is None:
            return None
        try:
            return (await asyncio.to_thread(self.uids.get, f"group:{group}")).uid
        except (UidError, OSError) as exc:
            raise BackendError("Your group's id could not be allocated; please tell your "
                               "admin.", f"gid of group {group}: {exc}", "uids") from exc

    async def _prepare_shares(self, user: str, limits: Limits) -> None:
        """Mount (make, grow) each group volume's quota disk before a member's container
        starts, and set its data directory up for the group (disks.share_permissions)."""
        if self.disks is None:
            return
        for share in limits.shares:
            name = self.share_name(share)
            gid = await self._group_gid(share.group)
            async with self._share_locks.setdefault(name, asyncio.Lock()):
                try:
                    mnt = await self.disks.ensure(name, share.size, subdirs=("data",))
                    await asyncio.to_thread(share_permissions, mnt / "data", gid)
                except (DiskError, OSError) as exc:
                    raise BackendError("A shared volume of your group could not be prepared; "
                                       "please tell your admin.", f"shared volume {name} of "
                                       f"{user}: {exc}", "disk") from exc
                size = self.disks.size(name)
                if share.size < size:
                    log.warning("shared volume %s: size %d MiB is below its %d MiB; a quota "
                                "cannot shrink, kept", name, share.size >> 20, size >> 20)

    # --- primitives ---------------------------------------------------------------------------

    async def _ignore_missing(self, method: str, path: str, **kw: Any) -> None:
        try:
            await self.docker.request(method, path, **kw)
        except DockerError as exc:
            if exc.status != 404:
                raise

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
        shared, gids = await self._share_mounts(limits)
        await self._create_network(user)
        spec = {
            "Image": self.image_of(limits),
            "Hostname": f"{user}-devbox",
            "Env": [f"DGW_USER={user}", *(await self.ids(user)).env(),
                    f"DGW_PROFILE={self.profile}", *(await self.mirror.daemon_env(net))],
            "Labels": self.labels(user, **{LABEL_SHARES: self._shares_label(limits)}),
            "HostConfig": {
                "Init": True,
                "NetworkMode": net,
                "Mounts": [
                    {"Type": "volume", "Source": vols["home"], "Target": f"/home/{user}"},
                    {"Type": "volume", "Source": vols["docker"], "Target": "/var/lib/docker"},
                    *shared,
                ],
                **({"GroupAdd": [str(g) for g in gids]} if gids else {}),
                **limit_spec(limits),
                **host_config(self.profile, limits),
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
                    f"image {self.image_of(limits)} not found: {exc.message}",
                    "image-missing") from exc
            raise

    async def _share_mounts(self, limits: Limits) -> tuple[list[dict[str, Any]], list[int]]:
        """The group volumes (made if new: a bind of the group disk's data/, which
        `_prepare_shares` mounts before each start) as mounts, and the gids to add."""
        mounts, gids = [], set()
        for share in limits.shares:
            name = self.share_name(share)
            body: dict[str, Any] = {"Name": name, "Labels": {
                LABEL_MANAGED: "true", LABEL_INSTANCE: self.prefix, LABEL_ROLE: "shared",
                LABEL_GROUP: share.group}}
            if self.disks is not None:
                body["DriverOpts"] = {"type": "none", "o": "bind",
                                      "device": os.fspath(self.disks.mountpoint(name) / "data")}
            await self.docker.request("POST", "/volumes/create", body=body)
            mounts.append({"Type": "volume", "Source": name, "Target": share.path,
                           "ReadOnly": share.read_only})
            gid = await self._group_gid(share.group)
            if gid is not None:
                gids.add(gid)
        return mounts, sorted(gids)

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
        except EngineUnreachable:
            raise  # its own words for her: an outage, try again later
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


def _short(image_id: str | None) -> str:
    return (image_id or "?").removeprefix("sha256:")[:12]


def _uptime(started: str) -> float | None:
    if not started or started.startswith("0001"):
        return None
    try:
        t = datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return None
    return max(0.0, time.time() - t.timestamp())



def _alive(pid: int) -> bool:
    """Whether a container's init still lives.  When a container is killed its init dies
    first and the kernel then kills the rest of its PID namespace, so a session's process
    killed with it finds the init dead or a zombie.  Unknown (no /proc view of the host
    PIDs, as in a containerised gateway without --pid host) counts as alive."""
    if pid <= 0:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
