"""The gateway: SSH listener, per-connection auth, and lifecycle (start → serve → shutdown)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import asyncssh

from . import forwarding
from .admin import AdminServer
from .aio import background
from .audit import AuditLog
from .auth import AuthorizedKey, match_key, verify_password
from .backend import ROOT_EQUIVALENT, Backend, DockerBackend, EnvState
from .config import GatewayConfig, User, UsersConfig, load_users
from .dockerapi import DockerClient
from .events import Events
from .guard import Guard
from .lifecycle import Activity, IdleCuller
from .metrics import MetricsServer
from .reload import UsersReloader, limits_of
from .session import GatewaySession

log = logging.getLogger("dind_gateway")

HOST_KEY_TYPES = (("ssh-ed25519", "ssh_host_ed25519_key", {}),
                  ("ssh-rsa", "ssh_host_rsa_key", {"key_size": 3072}))
_conn_ids = itertools.count(1)


def load_host_keys(state_dir: Path) -> list[asyncssh.SSHKey]:
    """Host keys from the state directory, generated on first start with mode 0600."""
    state_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for alg, name, kw in HOST_KEY_TYPES:
        path = state_dir / name
        if not path.exists():
            key = asyncssh.generate_private_key(alg, **kw)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key.export_private_key())
            log.info("generated host key %s", path)
        keys.append(asyncssh.read_private_key(path))
    return keys


def host_keypairs(keys: list[asyncssh.SSHKey],
                  algs: tuple[str, ...]) -> list[asyncssh.SSHKeyPair]:
    """Key pairs that sign only with the configured host-key algorithms, in that order.

    asyncssh offers every signature a key can make (``ssh-rsa`` with SHA-1 too); it has no
    server-side HostKeyAlgorithms, so each pair's list is narrowed here.  Keys left with no
    algorithm are not offered at all.
    """
    wanted = [a.encode() for a in algs]
    pairs = []
    for pair in asyncssh.load_keypairs(keys):
        allowed = [a for a in wanted if a in pair.host_key_algorithms]
        if allowed:
            pair.host_key_algorithms = allowed
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"no host key can sign with host_key_algorithms {', '.join(algs)}")
    return pairs


class Connection(asyncssh.SSHServer):
    """One client connection: authenticates a user and opens their sessions."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.id = next(_conn_ids)
        self.tag = f"conn={self.id}"
        self.peer = ""
        self.peer_port = 0
        self.username = ""
        self.user: User = None  # type: ignore[assignment]  # set by auth before any session
        self.key: AuthorizedKey | None = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self.refused = False  # closed by the guard before the handshake
        self.authenticated = False
        self.sessions: set[GatewaySession] = set()

    # --- connection -----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer, self.peer_port = peer[0], peer[1]
        if self.gateway.guard.admit(self.id, self.peer, conn) is not None:
            self.refused = True
            conn.abort()
            return
        self.gateway.connections.add(self)
        self.gateway.events.emit("connection.open", conn=self.id, peer=self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.guard.closed(self.id)
        if self.refused:
            return
        self.gateway.connections.discard(self)
        if self.authenticated:
            self.gateway.activity.connection_closed(self.user.name)
        self.gateway.events.emit("connection.close", conn=self.id, peer=self.peer,
                                 user=self.user.name if self.user else None)

    @property
    def ssh_connection(self) -> str:
        local = self.conn.get_extra_info("sockname") if self.conn else ("", 0)
        return f"{self.peer} {self.peer_port} {local[0]} {local[1]}"

    # --- authentication ---------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        if not self.username and self.gateway.config.banner and self.conn is not None:
            self.conn.send_auth_banner(self.gateway.config.banner.rstrip("\n") + "\n")
        self.username = username
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Match the offered key against the user's current keys and their restrictions.

        Unknown users, disabled users and wrong keys all give the same answer on the wire.
        """
        user = self.gateway.users.user(username)
        if user is None:
            reason = "unknown user"
        elif user.disabled:
            reason = "disabled user"
        else:
            entry, reason = match_key(user.keys, key, self.peer)
            if entry is not None:
                self.user, self.key = user, entry
                return True
        return self._auth_failed(username, "publickey", reason, key.get_fingerprint())

    def password_auth_supported(self) -> bool:
        """Offered only when some user has a password hash configured."""
        return self.gateway.users.has_passwords

    async def validate_password(self, username: str, password: str) -> bool:
        user = self.gateway.users.user(username)
        reason = "unknown user"
        if user is not None:
            reason = "disabled user" if user.disabled else "no password set"
            if not user.disabled and user.password:
                # bcrypt/argon2 are slow on purpose: keep them off the event loop.
                if await asyncio.to_thread(verify_password, password, user.password):
                    self.user, self.key = user, None
                    return True
                reason = "wrong password"
        return self._auth_failed(username, "password", reason)

    def _auth_failed(self, username: str, method: str, reason: str,
                     fingerprint: str | None = None) -> bool:
        """Log, audit and count one failed attempt; always False (the answer to the client)."""
        what = f"key={fingerprint}" if fingerprint else f"method={method}"
        log.warning("[%s] auth failed: user=%s peer=%s %s reason=%s", self.tag, username,
                    self.peer, what, reason)
        self.gateway.events.emit("auth.failure", conn=self.id, peer=self.peer, user=username,
                                 method=method, key=fingerprint, reason=reason)
        self.gateway.guard.auth_failed(self.id)
        return False

    def auth_completed(self) -> None:
        self.gateway.guard.auth_succeeded(self.id)
        self.authenticated = True
        self.gateway.activity.connection_opened(self.user.name)
        fingerprint = self.key.fingerprint if self.key else None
        log.info("[%s] auth ok: user=%s peer=%s key=%s", self.tag, self.user.name, self.peer,
                 fingerprint or "-")
        self.gateway.events.emit("auth.success", conn=self.id, peer=self.peer,
                                 user=self.user.name, method="publickey" if self.key else
                                 "password", key=fingerprint)

    # --- key options we enforce ourselves (asyncssh skips them for validated keys) ----

    def key_allows(self, what: str) -> bool:
        if self.key is None:
            return True
        if what == "pty":
            return self.key.allows_pty
        if what == "port-forwarding":
            return self.key.allows_port_forwarding
        return False

    def key_environment(self) -> dict[str, str]:
        return dict(self.key.environment) if self.key else {}

    def forced_command(self) -> str | None:
        return self.key.forced_command if self.key else None

    def notify_and_close(self, message: str) -> None:
        """One line to every open session's stderr, then a disconnect carrying it too."""
        for session in list(self.sessions):
            session.notify(message)
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, message)

    # --- channels -----------------------------------------------------------------------

    def session_requested(self) -> GatewaySession:
        limit = self.user.effective_max_sessions(self.gateway.config)
        if self.gateway.activity.sessions[self.user.name] >= limit:
            log.warning("[%s] session refused for %s: max_sessions %d reached", self.tag,
                        self.user.name, limit)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"too many open sessions for {self.user.name} (max_sessions is {limit})")
        return GatewaySession(self)

    def session_opened(self, session: GatewaySession) -> None:
        self.sessions.add(session)
        self.gateway.activity.session_opened(self.user.name)

    def session_closed(self, session: GatewaySession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.gateway.activity.session_closed(self.user.name)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> object:
        return forwarding.direct_tcpip(self, dest_host, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # remote forwarding (-R) is not offered


def check_profile(profile: str) -> None:
    """Say at start what the security profile means, and refuse one this host cannot run."""
    if profile in ROOT_EQUIVALENT:
        log.warning("security_profile %s: users are root-equivalent on the host: for trusted "
                    "teams only (docs/security.md); the default 'rootless' is not", profile)
    if profile == "rootless":
        # The kernel is the engine's too (a containerised gateway shares it); /dev/net/tun is
        # checked by the engine when a container is created, and its error reaches the user.
        try:
            userns = int(Path("/proc/sys/user/max_user_namespaces").read_text())
        except (OSError, ValueError):
            userns = 1
        if userns == 0:
            raise SystemExit("dind-gateway: security_profile rootless cannot run on this host "
                             "(user namespaces are disabled: user.max_user_namespaces = 0); "
                             "enable them, or choose sysbox (or, for a trusted team only, "
                             "hardened) in gateway.yaml")


class Gateway:
    """Owns configuration, the backend and the listener; one per process."""

    def __init__(self, config: GatewayConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.users: UsersConfig = load_users(config.users_file)
        self.events = Events()
        self.audit = AuditLog.from_config(config)
        if self.audit is not None:
            self.events.subscribe(self.audit)
        self.guard = Guard.from_config(config, self.events)
        self.backend: Backend = backend or DockerBackend(
            DockerClient(config.docker_url()), image=config.image, prefix=config.prefix,
            profile=config.security_profile, ready_timeout=config.ready_timeout,
            events=self.events, network_pool=str(config.user_network_pool),
            disks_dir=config.state_dir / "disks", uids_file=config.state_dir / "uids.json")
        self.metrics = MetricsServer.for_gateway(self) if config.metrics_listen else None
        self.connections: set[Connection] = set()
        self.activity = Activity()
        self.culler = IdleCuller(self)
        self.reloader = UsersReloader(self)
        self.admin = AdminServer(self)
        self._server: asyncssh.SSHAcceptor | None = None
        self._stopped = asyncio.Event()

    def container_name(self, user: str) -> str:
        return f"{self.config.prefix}-{user}"

    def user_lock(self, user: str) -> asyncio.Lock:
        return self.backend.lock(user)

    async def ensure_environment(self, user: User,
                                 progress: Callable[[str], None] | None = None) -> EnvState:
        return await self.backend.ensure(user.name, limits_of(user), progress)

    async def adopt(self) -> None:
        """Take over the environments a previous run left: never a second container per user.

        Running ones keep running and their idle clock starts now; those of users who are no
        longer allowed in are stopped (their volumes are kept).
        """
        for state in await self.backend.list_environments():
            user = self.users.user(state.user)
            if not state.running:
                continue
            if user is None or user.disabled:
                log.info("stopping %s's environment: user no longer allowed", state.user)
                await self.backend.stop(state.user)
                continue
            self.activity.touch(state.user)
            log.info("adopted running environment of %s (%s)", state.user,
                     state.container_id[:12])

    async def start(self) -> None:
        keys = load_host_keys(self.config.state_dir)
        check_profile(self.config.security_profile)
        await self.adopt()
        self.culler.start()
        self.reloader.start()
        await self.admin.start()
        for key in keys:
            log.info("host key %s %s", key.get_algorithm(), key.get_fingerprint())
        self._server = await asyncssh.listen(
            self.config.listen_host, self.config.listen_port,
            server_factory=lambda: Connection(self),
            server_host_keys=host_keypairs(keys, self.config.host_key_algorithms),
            # The client's order decides, so speed comes from what is offered: AES-GCM only
            # by default (gateway.yaml `ciphers`; see docs/benchmarks.md).  kex/MAC lists:
            # no SHA-1, no NIST curves (gateway.yaml `kex_algorithms`, `macs`).
            encryption_algs=list(self.config.ciphers),
            kex_algs=list(self.config.kex_algorithms), mac_algs=list(self.config.macs),
            encoding=None,
            login_timeout=self.config.login_grace_time, reuse_address=True,
            # no GSSAPI: otherwise asyncssh resolves our FQDN per connection (a DNS stall)
            gss_host=None)
        port = self._server.sockets[0].getsockname()[1]
        self.port = port
        log.info("listening on %s:%s", self.config.listen_host, port)
        if self.metrics is not None:
            await self.metrics.start()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, tell open sessions, close them.  User containers keep running."""
        if self._server is not None:
            self._server.close()
        await self.culler.stop()
        await self.reloader.stop()
        await self.admin.close()
        notice = ("dind-gateway is restarting; your container keeps running. "
                  "Reconnect in a moment.")
        for c in list(self.connections):
            c.notify_and_close(notice)
        waits = [c.conn.wait_closed() for c in self.connections if c.conn is not None]
        if waits:
            await asyncio.wait([asyncio.ensure_future(w) for w in waits], timeout=grace)
        if self.metrics is not None:
            await self.metrics.close()
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: background(self.close()))
        # SIGHUP re-reads the users file, like sshd re-reads its configuration.
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: background(self.reloader.reload("SIGHUP")))


