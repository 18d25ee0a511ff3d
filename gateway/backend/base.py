"""The backend contract: the only way the rest of the gateway touches user environments.

In the spirit of JupyterHub's Spawner: a small set of operations, each idempotent ("already
running", "already stopped" and "already gone" are success), each serialised per user inside the
backend, none with a timeout of its own beyond what the platform needs (the caller owns
timeouts).  Docker (`backend.docker`) and a local-process fake (`backend.fake`) implement it; a
Kubernetes backend follows the same shape.  One conformance suite (tests/conformance) runs
against every implementation.

Failures are `BackendError`s: a user-safe text, a log text and a reason label.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..errors import GatewayError
from ..observe.events import Events

log = logging.getLogger("dind_gateway.backend")

Progress = Callable[[str], None]
ProcessKind = Literal["shell", "command", "sftp", "argv"]


class BackendError(GatewayError):
    """An environment or a process in it could not be provided."""


@dataclass(frozen=True)
class Share:
    """A group's shared volume in a member's environment (quota `size` bytes)."""

    group: str
    name: str
    path: str
    size: int
    read_only: bool = False


@dataclass(frozen=True)
class Limits:
    """Resource caps for one environment; None means unlimited.

    Also what the environment is made from, applied when it is (re)created, never live:
    `image` (None: the backend's default) and the group volumes it mounts (`shares`)."""

    cpus: float | None = None
    memory: int | None = None
    pids: int | None = None
    disk: int | None = None
    image: str | None = None
    shares: tuple[Share, ...] = ()

    @classmethod
    def of(cls, settings: Any) -> Limits:
        """The caps of anything carrying cpus/memory/pids/disk (a users.yaml `User`), with
        its `image` and `volumes` if it has them."""
        shares = tuple(Share(group=v.group, name=v.name, path=v.path, size=v.size,
                             read_only=v.read_only) for v in getattr(settings, "volumes", ()))
        return cls(cpus=settings.cpus, memory=settings.memory, pids=settings.pids,
                   disk=settings.disk, image=getattr(settings, "image", None), shares=shares)

    @property
    def caps(self) -> Limits:
        """Only the resource caps (what `update_limits` can change live)."""
        return Limits(cpus=self.cpus, memory=self.memory, pids=self.pids, disk=self.disk)


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


@dataclass
class EnvStats:
    """Usage figures for `dind-gateway ps` and metrics; None where the platform has none."""

    uptime: float | None = None
    cpu_percent: float | None = None
    mem_bytes: int | None = None
    mem_limit: int | None = None
    pids: int | None = None
    cache_bytes: int | None = None
    disk: tuple[int, int] | None = None  # (used, quota) bytes

    def as_row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class ProcessSpec:
    """What to run for one session, independent of the platform.

    kind: ``shell`` (the user's login shell), ``command`` (run by her shell, like sshd's
    ``shell -c``), ``sftp`` (the platform's sftp-server) or ``argv`` (exactly this argv, no
    shell: housekeeping).  The process always runs as `user`, in `workdir` or her home.
    """

    user: str
    kind: ProcessKind
    command: str = ""
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    tty: bool = False
    size: tuple[int, int] = (80, 24)  # columns, rows
    workdir: str | None = None
    shell: str | None = None


class Listener(abc.ABC):
    """A listener in the user's environment (`ssh -R`'s port, the forwarded agent's socket
    file): connections her processes make to it come out of `accept`.

    It listens until `close` (idempotent; removes a socket file), which the gateway calls when
    the SSH connection that asked for it ends; a listener whose platform side went away
    (environment stopped, the platform's stream lost) makes `accept` raise `BackendError`.
    """

    port: int = 0  # TCP: the port bound on 127.0.0.1 (the one picked when 0 was asked)
    path: str = ""  # unix: where her processes find the socket file

    @abc.abstractmethod
    async def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        """The next connection: a connected, non-blocking stream socket on the gateway's side
        and the peer's (host, port) as seen in her environment (("", 0) for unix)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SocketListener(Listener):
    """A `Listener` over a listening socket the gateway holds (one made in her network
    namespace, or bound to a file in her filesystem); `cleanup` runs once at `close`."""

    def __init__(self, sock: socket.socket, path: str = "",
                 cleanup: Callable[[], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.path = path
        self.port = sock.getsockname()[1] if sock.family != socket.AF_UNIX else 0
        self._cleanup = cleanup
        self._closed = False

    async def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        if self._closed:
            raise BackendError("the listener is closed", "accept on a closed listener",
                               "listener-closed")
        try:
            conn, peer = await asyncio.get_running_loop().sock_accept(self.sock)
        except OSError as exc:
            raise BackendError("the listener ended", f"accept: {exc}", "listener-closed") from exc
        conn.setblocking(False)
        if conn.family == socket.AF_UNIX:
            return conn, ("", 0)
        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, (peer[0], peer[1])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cleanup is not None:
            self._cleanup()  # closes the socket too
        self.sock.close()


class Process(Protocol):
    """A process started in an environment, with its byte streams.

    State machine: *running* → *output ended* (`read()` returned ``(0, b"")``) → *exited*
    (`wait()` returned its status).  `write`/`write_eof` are accepted until the process ends
    and ignored after; `buffered` tells how much input waits to be delivered and `drain`
    waits for it (flow control).  `resize` and `signal` are best effort: a process that just
    ended is not an error.  `close` is allowed in any state and idempotent; it ends our side
    (the process sees end of input / hang-up).  The exit status follows the shell convention:
    128 + n for a process killed by signal n; `exit_signal` then says so, as (name without
    SIG, core dumped), where the platform can tell that from `exit 128+n` (else None), and
    the session sends `exit-signal` as sshd does.
    """

    exit_signal: tuple[str, bool] | None

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None: ...

    def buffered(self) -> int: ...

    async def drain(self) -> None: ...

    async def read(self) -> tuple[int, bytes]:
        """(1, data) from stdout, (2, data) from stderr, (0, b"") once output has ended."""
        ...

    async def resize(self, rows: int, cols: int) -> None: ...

    async def signal(self, name: str) -> None:
        """Deliver SIGname (e.g. "INT") to the process."""
        ...

    async def wait(self) -> int: ...

    def close(self) -> None: ...


class Backend(abc.ABC):
    """What the gateway needs from a container platform."""

    events: Events  # where it says what happened (container.start, .stop, ...)
    # what an admin should do when the platform does not answer (logged at start)
    outage_hint: str = "check that the container platform is up and reachable"

    @abc.abstractmethod
    async def ensure(self, user: str, limits: Limits,
                     progress: Progress | None = None) -> EnvState:
        """Make the user's environment exist, run and be ready; create/start only if needed.

        `progress` gets short texts for the user while a start takes time."""

    @abc.abstractmethod
    async def stop(self, user: str, *, unless: Callable[[], bool] | None = None) -> bool:
        """Stop the environment, keeping its data; missing or stopped is fine.

        `unless` is checked once the user's lifecycle lock is held (e.g. "someone logged in
        meanwhile"); if it says so nothing is stopped.  True when this call stopped it."""

    @abc.abstractmethod
    async def inspect(self, user: str) -> EnvState:
        """Current state; `exists=False` when there is nothing."""

    @abc.abstractmethod
    async def start(self, spec: ProcessSpec) -> Process:
        """Start a process in the user's running environment, as the user."""

    @abc.abstractmethod
    async def open_connection(self, user: str, port: int) -> socket.socket:
        """A connected TCP socket to `port` in the user's environment (for `ssh -L`)."""

    @abc.abstractmethod
    async def open_unix(self, user: str, path: str) -> socket.socket:
        """A connected unix socket to a socket file of hers in her environment (`ssh -L`
        with a socket path, as IDEs forward their server's socket)."""

    @abc.abstractmethod
    async def listen_tcp(self, user: str, port: int) -> Listener:
        """A listener on 127.0.0.1:port in the user's environment (`ssh -R`); port 0 picks
        a free one (then `Listener.port` says which)."""

    @abc.abstractmethod
    async def listen_unix(self, user: str, name: str) -> Listener:
        """A listening unix socket `name` in a directory of the user's own (0700) in her
        environment (the forwarded ssh-agent); `Listener.path` is where."""

    @abc.abstractmethod
    def aliases(self, user: str) -> set[str]:
        """Host names that mean "my own environment" in a forwarding request."""

    def environment(self, user: str) -> dict[str, str]:
        """Variables every session of the user gets (e.g. DOCKER_HOST for her daemon)."""
        return {}

    @abc.abstractmethod
    async def list_environments(self) -> list[EnvState]:
        """Every environment this gateway instance owns, running or not."""

    @abc.abstractmethod
    async def has_workloads(self, user: str) -> bool:
        """Whether the environment is busy on its own (inner containers): culling keeps it."""

    @abc.abstractmethod
    async def update_limits(self, user: str, limits: Limits) -> None:
        """Apply new caps to a running environment without restarting it."""

    @abc.abstractmethod
    async def purge(self, user: str) -> None:
        """Delete the environment and all its data."""

    @abc.abstractmethod
    async def stats(self, user: str) -> EnvStats:
        """Usage of one environment (empty figures when it is not running)."""

    @abc.abstractmethod
    async def health(self) -> str:
        """A short "ok" text, or BackendError when the platform cannot serve."""

    async def reap(self, user: str) -> None:  # noqa: B027 - optional hook
        """End the sessions a previous gateway process left in this environment (their
        clients went with it), as sshd's sessions end with their connection."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (connections, spare processes)."""

    async def check_image(self, ref: str) -> str | None:
        """None when environments can be made from image `ref`, else why not (for the admin).
        Platforms without images say None."""
        return None

    async def outdated(self, user: str, limits: Limits) -> str | None:
        """Why the user's existing environment is not what `limits` would make now (its image
        was rebuilt or changed, its group volumes differ), or None (also when there is none)."""
        return None

    async def upgrade(self, user: str, limits: Limits, *,
                      unless: Callable[[], bool] | None = None) -> str:
        """Make an outdated environment again from `limits`, keeping its data and network
        (running: stopped, made again and started; stopped: made again, started at the next
        login).  `unless` as for `stop` (then nothing is done).  A short text of what was
        done."""
        return "nothing to upgrade"

    def _ready_now(self, user: str, name: str, state: EnvState, started: float,
                   announce: Progress | None) -> float:
        """What every backend says once an environment is ready: the log line, the
        `container.start` event (metrics' start-time histogram) and the user's " ready in"."""
        elapsed = time.monotonic() - started
        log.info("environment of %s ready in %.2f s (%s %s)", user, elapsed, name,
                 state.container_id[:12])
        self.events.emit("container.start", user=user, container=name,
                         duration=round(elapsed, 3), adopted=announce is None)
        if announce:
            announce(f" ready in {elapsed:.1f} s\n")
        return elapsed

    async def run(self, user: str, argv: list[str]) -> tuple[int, bytes]:
        """Run a short housekeeping command *as the user* and collect its stdout.

        Never as root: the environment is hers, and nothing the gateway runs there as root may
        read anything she controls."""
        return await collect(await self.start(ProcessSpec(user=user, kind="argv",
                                                          argv=tuple(argv), workdir="/")))


async def collect(proc: Process) -> tuple[int, bytes]:
    """A short process's exit status and stdout (its stderr dropped)."""
    out = []
    try:
        while True:
            stream, data = await proc.read()
            if not stream:
                break
            if stream == 1:
                out.append(data)
    finally:
        proc.close()
    return await proc.wait(), b"".join(out)
