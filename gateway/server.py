"""The gateway: SSH listener, per-connection auth, and lifecycle (start → serve → shutdown)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncssh

from .backend import Backend, DockerBackend, Limits
from .config import AuthorizedKey, GatewayConfig, User, UsersConfig, load_users
from .dockerapi import DockerClient
from .events import Events
from .session import GatewaySession

log = logging.getLogger("dind_gateway")

# aes-gcm first: OpenSSH clients otherwise pick chacha20-poly1305, which costs asyncssh about
# twice the CPU per byte (shared/notes/asyncssh-and-exec.md).
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                   "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr"]
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

    # --- connection -----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer, self.peer_port = peer[0], peer[1]
        self.gateway.connections.add(self)
        self.gateway.events.emit("connection.open", conn=self.id, peer=self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.connections.discard(self)
        self.gateway.events.emit("connection.close", conn=self.id, peer=self.peer,
                                 user=self.user.name if self.user else None)

    @property
    def ssh_connection(self) -> str:
        local = self.conn.get_extra_info("sockname") if self.conn else ("", 0)
        return f"{self.peer} {self.peer_port} {local[0]} {local[1]}"

    # --- authentication ---------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        self.username = username
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Match the offered key against the user's current keys and their restrictions.

        Unknown users, disabled users and wrong keys all give the same answer on the wire.
        """
        user = self.gateway.users.user(username)
        now = datetime.now(UTC)
        reason = "unknown user"
        if user is not None:
            reason = "disabled user" if user.disabled else "key not authorized"
            for entry in () if user.disabled else user.keys:
                if entry.key.public_data != key.public_data:
                    continue
                if entry.is_expired(now):
                    reason = "key expired"
                elif not entry.matches_peer(self.peer):
                    reason = "from= does not match peer"
                else:
                    self.user, self.key = user, entry
                    return True
        fingerprint = key.get_fingerprint()
        log.warning("[%s] auth failed: user=%s peer=%s key=%s reason=%s", self.tag, username,
                    self.peer, fingerprint, reason)
        self.gateway.events.emit("auth.failure", conn=self.id, peer=self.peer, user=username,
                                 method="publickey", key=fingerprint, reason=reason)
        return False

    def auth_completed(self) -> None:
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

    # --- channels -----------------------------------------------------------------------

    def session_requested(self) -> GatewaySession:
        return GatewaySession(self)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # remote forwarding (-R) is not offered


class Gateway:
    """Owns configuration, the backend and the listener; one per process."""

    def __init__(self, config: GatewayConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.users: UsersConfig = load_users(config.users_file)
        self.events = Events()
        self.backend: Backend = backend or DockerBackend(
            DockerClient(config.docker_url()), image=config.image, prefix=config.prefix,
            profile=config.security_profile, ready_timeout=config.ready_timeout,
            events=self.events)
        self.connections: set[Connection] = set()
        self._server: asyncssh.SSHAcceptor | None = None
        self._stopped = asyncio.Event()

    async def ensure_environment(self, user: User,
                                 progress: Callable[[str], None] | None = None) -> None:
        await self.backend.ensure(user.name, limits_of(user), progress)

    async def start(self) -> None:
        keys = load_host_keys(self.config.state_dir)
        for key in keys:
            log.info("host key %s %s", key.get_algorithm(), key.get_fingerprint())
        self._server = await asyncssh.listen(
            self.config.listen_host, self.config.listen_port,
            server_factory=lambda: Connection(self), server_host_keys=keys,
            encryption_algs=ENCRYPTION_ALGS, encoding=None,
            login_timeout=self.config.login_grace_time, reuse_address=True)
        port = self._server.sockets[0].getsockname()[1]
        self.port = port
        log.info("listening on %s:%s", self.config.listen_host, port)

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        """Stop accepting, tell open sessions, close them.  User containers keep running."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for c in list(self.connections):
            if c.conn is not None:
                c.conn.disconnect(asyncssh.DISC_BY_APPLICATION, "dind-gateway is shutting down")
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.create_task(self.close()))


def limits_of(user: User) -> Limits:
    return Limits(cpus=user.cpus, memory=user.memory, pids=user.pids)
