"""The composition root: builds every part, and owns start → serve → bounded shutdown.

Nothing imports this module (the `dind-gateway` console script and `python -m gateway` start
here).  Each part gets what it needs and no more: the SSH layer an `SSHContext`, the services
the backend, the registry of live connections and a way to read the current users.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import asyncssh

from . import cli
from .aio import background
from .backend import Backend
from .config import GatewayConfig, UsersConfig, load_users
from .observe.audit import AuditLog
from .observe.events import Events
from .observe.metrics import Metrics, MetricsServer
from .services.admin import AdminServer
from .services.adopter import Adopter
from .services.culler import IdleCuller
from .services.registry import Registry
from .services.reloader import UsersReloader
from .ssh.context import SSHContext
from .ssh.guard import Guard
from .ssh.server import Connection, host_keypairs, load_host_keys

log = logging.getLogger("dind_gateway")

RESTART_NOTICE = "dind-gateway is restarting; your container keeps running. Reconnect in a moment."


def make_backend(config: GatewayConfig, events: Events) -> Backend:
    """The backend named in gateway.yaml (`backend:`), built from its settings."""
    if config.backend == "fake":
        from .backend.fake import FakeBackend

        return FakeBackend(config.state_dir / "fake", events=events)
    if config.backend == "kubernetes":
        from .backend import kubernetes

        return kubernetes.from_config(config, events)
    from .backend import docker

    return docker.from_config(config, events)


class App:
    """One gateway process: configuration, backend, listener and services."""

    def __init__(self, config: GatewayConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.users: UsersConfig = load_users(config.users_file)
        self.events = Events()
        self.audit = AuditLog.from_config(config)
        if self.audit is not None:
            self.events.subscribe(self.audit)
        self.guard = Guard.from_config(config, self.events)
        self.backend = backend or make_backend(config, self.events)
        self.registry = Registry()
        self.adopter = Adopter(self.backend, self._current_users, self.registry.activity)
        self.ctx = SSHContext(config=config, backend=self.backend, events=self.events,
                              guard=self.guard, registry=self.registry,
                              users=self._current_users, ready=self.adopter.ready)
        self.culler = IdleCuller(self.backend, self.registry.activity, self._current_users,
                                 config, self.events)
        self.reloader = UsersReloader(config.users_file, self._current_users,
                                      self._replace_users, self.backend, self.registry,
                                      self.events)
        self.admin = AdminServer(config.state_dir, self.backend, self.registry,
                                 self._current_users, self.reloader.reload)
        self.metrics = self._metrics() if config.metrics_listen else None
        self.port = 0
        self._server: asyncssh.SSHAcceptor | None = None
        self._stopped = asyncio.Event()
        self._closing: asyncio.Task[None] | None = None

    def _current_users(self) -> UsersConfig:
        return self.users

    def _replace_users(self, users: UsersConfig) -> None:
        self.users = users

    def _metrics(self) -> MetricsServer:
        assert self.config.metrics_listen is not None
        metrics = Metrics()
        self.events.subscribe(metrics)

        disk_usage = getattr(self.backend, "disk_usage", None)  # quota disks: docker only

        async def container_states() -> dict[str, int]:
            counts: dict[str, int] = {}
            disks: dict[str, tuple[int, int]] = {}
            for env in await self.backend.list_environments():
                counts[env.status] = counts.get(env.status, 0) + 1
                found = disk_usage(env.user) if disk_usage is not None else None
                if found is not None:  # a statvfs of a mounted disk: cheap
                    disks[env.user] = found
            metrics.set_disks(disks)
            return counts

        def before_scrape() -> None:
            metrics.unauthenticated.set(self.guard.unauthenticated)
            metrics.banned.set(self.guard.banned_sources())

        return MetricsServer(metrics, self.config.metrics_listen, ping=self.backend.health,
                             container_states=container_states, before_scrape=before_scrape)

    async def start(self) -> None:
        keys = load_host_keys(self.config.state_dir)
        await self.adopter.start()  # engine down: logged, retried, logins told to try again
        self.culler.start()
        self.reloader.start()
        await self.admin.start()
        for key in keys:
            log.info("host key %s %s", key.get_algorithm(), key.get_fingerprint())
        self._server = await asyncssh.listen(
            self.config.listen_host, self.config.listen_port,
            server_factory=lambda: Connection(self.ctx),
            server_host_keys=host_keypairs(keys, self.config.host_key_algorithms),
            # The client's order decides, so speed comes from what is offered: AES-GCM only
            # by default (gateway.yaml `ciphers`; see docs/benchmarks.md).  kex/MAC lists:
            # no SHA-1, no NIST curves (gateway.yaml `kex_algorithms`, `macs`).
            encryption_algs=list(self.config.ciphers),
            kex_algs=list(self.config.kex_algorithms), mac_algs=list(self.config.macs),
            encoding=None,
            login_timeout=self.config.login_grace_time, reuse_address=True,
            # sshd's ClientAlive*: a client gone from the network is dropped after
            # interval x count, so its sessions end and its environment can be culled
            keepalive_interval=self.config.client_alive_interval or 0,
            keepalive_count_max=self.config.client_alive_count_max,
            # no GSSAPI: otherwise asyncssh resolves our FQDN per connection (a DNS stall)
            gss_host=None)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s:%s", self.config.listen_host, self.port)
        if self.metrics is not None:
            await self.metrics.start()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def shutdown(self) -> asyncio.Task[None]:
        """Start closing (once: a second SIGTERM joins the first shutdown)."""
        if self._closing is None:
            self._closing = background(self.close())
        return self._closing

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, tell open sessions, close them.  Environments keep running."""
        if self._server is not None:
            self._server.close()
        await self.adopter.stop()
        await self.culler.stop()
        await self.reloader.stop()
        await self.admin.close()
        conns = self.registry.connections()
        for c in conns:
            c.notify_and_close(RESTART_NOTICE)
        waits = [c.conn.wait_closed() for c in conns
                 if isinstance(c, Connection) and c.conn is not None]
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=grace)
        if self.metrics is not None:
            await self.metrics.close()
        await self.backend.close()
        if self.audit is not None:
            self.audit.close()
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown)
        # SIGHUP re-reads the users file, like sshd re-reads its configuration.
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: background(self.reloader.reload("SIGHUP")))


async def serve(config: GatewayConfig) -> int:
    """Run one gateway until SIGTERM/SIGINT."""
    app = App(config)
    await app.start()
    app.install_signal_handlers()
    print(f"dind-gateway listening on {config.listen_host}:{app.port}", flush=True)
    await app.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `dind-gateway` command."""
    return cli.main(argv, serve=serve)


if __name__ == "__main__":
    sys.exit(main())
