"""The SSH server side: host keys, and one `Connection` per client (guard, auth, channels).

A connection holds its principal (user + key) and the `SSHContext` it was given; sessions and
forwards are opened from here.  Nothing in this package knows which backend runs behind it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from pathlib import Path

import asyncssh

from ..auth import AuthorizedKey, match_key, verify_password
from ..config import User
from ..errors import GatewayError
from . import forwarding, quickack, wire
from .certs import Certificate, CertRefused
from .context import SSHContext
from .program import Principal
from .session import GatewaySession
from .tunnels import AgentRelay, RemoteForward

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

    def __init__(self, ctx: SSHContext) -> None:
        self.ctx = ctx
        self.id = next(_conn_ids)
        self.tag = f"conn={self.id}"
        self.peer = ""
        self.peer_port = 0
        self.username = ""
        self.user: User = None  # type: ignore[assignment]  # set by auth before any session
        self.key: AuthorizedKey | None = None  # a plain key's line, or the cert-authority line
        self.cert: Certificate | None = None  # the certificate she logged in with
        self.conn: asyncssh.SSHServerConnection | None = None
        self.refused = False  # closed by the guard before the handshake
        self.authenticated = False
        self.sessions: set[GatewaySession] = set()
        self.agent_requested = False
        self._agent: AgentRelay | None = None
        self._agent_lock = asyncio.Lock()
        self._remote: set[RemoteForward] = set()
        self.gone = False  # connection_lost has run: nothing more may be made for it

    # --- connection -----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        # no 40 ms delayed-ACK stalls while she logs in (quickack.py); asyncssh keeps its
        # transport private, and without one (a tunnelled connection) nothing is done
        quickack.install(getattr(conn, "_transport", None))
        wire.install(conn)  # one packet per message, not two (wire.py)
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer, self.peer_port = peer[0], peer[1]
        if self.ctx.guard.admit(self.id, self.peer, conn, versioned=lambda: conn.get_extra_info(
                "client_version") is not None) is not None:
            self.refused = True
            conn.abort()
            return
        self.ctx.registry.add(self)
        self.ctx.events.emit("connection.open", conn=self.id, peer=self.peer)
        # asyncssh would listen for the forwarded agent on the gateway host, where anything
        # running as the gateway's user could use it; ours lives in her container instead
        conn.create_agent_listener = self._agent_forwarding_requested  # type: ignore[method-assign]
        # every offered key and certificate is screened (certs.py) before asyncssh sees it
        self._asyncssh_validate = conn.validate_public_key
        conn.validate_public_key = self._key_offered  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.ctx.guard.closed(self.id)
        if self.refused:
            return
        self.ctx.registry.discard(self)
        if self._agent is not None:
            self._agent.close()
        for listener in list(self._remote):
            listener.close()
        if self.authenticated:
            self.ctx.registry.activity.connection_closed(self.user.name)
        self.ctx.events.emit("connection.close", conn=self.id, peer=self.peer,
                                 user=self.user.name if self.user else None)

    @property
    def login(self) -> str:
        if self.cert is not None:
            return f"cert {self.cert.key_id!r} (serial {self.cert.serial})"
        if self.key is not None:
            return f"key {self.key.fingerprint}"
        return "password"

    @property
    def principal(self) -> Principal:
        return Principal(self.user, self.key)

    @property
    def ssh_connection(self) -> str:
        local = self.conn.get_extra_info("sockname") if self.conn else ("", 0)
        return f"{self.peer} {self.peer_port} {local[0]} {local[1]}"

    # --- authentication ---------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        if not self.username and self.ctx.config.banner and self.conn is not None:
            self.conn.send_auth_banner(self.ctx.config.banner.rstrip("\n") + "\n")
        self.username = username
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def _key_offered(self, username: str, key_data: bytes, msg: bytes,
                           signature: bytes) -> bool:
        """A key or certificate offered: our certificate policy first, then asyncssh's own
        checks (signature; for certificates validity, principals and options, as decided)."""
        assert self.conn is not None
        user = self.ctx.users().user(username)
        try:
            verdict = self.ctx.certs.screen(key_data, user, username, self.peer)
        except CertRefused as exc:
            return self._auth_failed(username, "publickey", exc.reason, exc.fingerprint,
                                     exc.cert)
        self.conn.set_authorized_keys(verdict.authorized)  # type: ignore[arg-type]
        ok = await self._asyncssh_validate(username, key_data, msg, signature)
        if verdict.cert is None:
            if ok:
                self.cert = None  # an earlier certificate query did not end in a login
            return ok  # a plain key: validate_public_key below has decided (and audited)
        if not ok:
            return self._auth_failed(username, "publickey", "bad certificate signature",
                                     verdict.cert.fingerprint, verdict.cert)
        assert user is not None
        self.user, self.key, self.cert = user, verdict.entry, verdict.cert
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Match the offered key against the user's current keys and their restrictions.

        Unknown users, disabled users and wrong keys all give the same answer on the wire.
        """
        user = self.ctx.users().user(username)
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
        return self.ctx.users().has_passwords

    async def validate_password(self, username: str, password: str) -> bool:
        user = self.ctx.users().user(username)
        reason = "unknown user"
        if user is not None:
            reason = "disabled user" if user.disabled else "no password set"
            if not user.disabled and user.password:
                # bcrypt/argon2 are slow on purpose: keep them off the event loop.
                if await asyncio.to_thread(verify_password, password, user.password):
                    self.user, self.key, self.cert = user, None, None
                    return True
                reason = "wrong password"
        return self._auth_failed(username, "password", reason)

    def _auth_failed(self, username: str, method: str, reason: str,
                     fingerprint: str | None = None, cert: Certificate | None = None) -> bool:
        """Log, audit and count one failed attempt; always False (the answer to the client)."""
        what = f"key={fingerprint}" if fingerprint else f"method={method}"
        if cert is not None:
            what += f" cert_id={cert.key_id!r} serial={cert.serial} ca={cert.ca_fingerprint}"
        log.warning("[%s] auth failed: user=%s peer=%s %s reason=%s", self.tag, username,
                    self.peer, what, reason)
        self.ctx.events.emit("auth.failure", conn=self.id, peer=self.peer, user=username,
                                 method=method, key=fingerprint, reason=reason,
                                 **(cert.audit() if cert else {}))
        self.ctx.guard.auth_failed(self.id)
        return False

    def auth_completed(self) -> None:
        self.ctx.guard.auth_succeeded(self.id)
        self.authenticated = True
        self.ctx.registry.activity.connection_opened(self.user.name)
        cert = self.cert
        fingerprint = cert.fingerprint if cert else self.key.fingerprint if self.key else None
        if cert is not None:  # every later log line of this connection names the certificate
            self.tag = f"conn={self.id} cert={cert.key_id!r}"
        log.info("[%s] auth ok: user=%s peer=%s key=%s%s", self.tag, self.user.name, self.peer,
                 fingerprint or "-", f" cert_id={cert.key_id!r} serial={cert.serial}"
                 if cert else "")
        self.ctx.events.emit("auth.success", conn=self.id, peer=self.peer,
                                 user=self.user.name, method="publickey" if fingerprint else
                                 "password", key=fingerprint,
                                 **(cert.audit() if cert else {}))

    # --- key options we enforce ourselves (asyncssh skips them for validated keys) ----

    def key_allows(self, what: str) -> bool:
        """The key line's options and the certificate's permit-* extensions: both must."""
        if self.cert is not None and not self.cert.permits(what):
            return False
        if self.key is None:
            return True
        if what == "pty":
            return self.key.allows_pty
        if what == "port-forwarding":
            return self.key.allows_port_forwarding
        if what == "agent-forwarding":
            return self.key.allows_agent_forwarding
        return False

    def forced_command(self) -> str | None:
        if self.cert is not None and self.cert.force_command is not None:
            return self.cert.force_command
        return self.key.forced_command if self.key else None

    def notify_and_close(self, message: str) -> None:
        """One line to every open session's stderr, then a disconnect carrying it too."""
        for session in list(self.sessions):
            session.notify(message)
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, message)

    # --- channels -----------------------------------------------------------------------

    def session_requested(self) -> GatewaySession:
        """A new session channel; its slot under `max_sessions` is taken here, at once, so a
        burst of channel opens cannot overshoot the cap."""
        activity = self.ctx.registry.activity
        limit = self.user.effective_max_sessions(self.ctx.config)
        if activity.sessions[self.user.name] >= limit:
            log.warning("[%s] session refused for %s: max_sessions %d reached", self.tag,
                        self.user.name, limit)
            self.ctx.events.emit("session.refused", conn=self.id, user=self.user.name,
                                 reason=f"max_sessions {limit} reached")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"too many open sessions for {self.user.name} (max_sessions is {limit})")
        session = GatewaySession(self)
        self.sessions.add(session)
        activity.session_opened(self.user.name)
        return session

    def session_closed(self, session: GatewaySession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.ctx.registry.activity.session_closed(self.user.name)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> object:
        return forwarding.direct_tcpip(self, dest_host, dest_port)

    def unix_connection_requested(self, dest_path: str) -> object:
        return forwarding.direct_streamlocal(self, dest_path)

    def server_requested(self, listen_host: str, listen_port: int) -> object:
        """`ssh -R port:…`: a listener on 127.0.0.1:port *in her container* (as sshd's
        GatewayPorts=no), ending with this connection.  Her processes, and her inner containers
        through the host gateway address, reach the client's service there."""
        def refuse(reason: str) -> bool:
            log.warning("[%s] remote forward refused: user=%s %s:%s: %s", self.tag,
                        self.user.name, listen_host, listen_port, reason)
            self.ctx.events.emit("forward.refused", conn=self.id, user=self.user.name,
                                 host=listen_host, port=listen_port, direction="remote",
                                 reason=reason)
            return False

        if not self.ctx.config.allow_remote_forwarding:
            return refuse("remote forwarding is disabled on this gateway")
        if not self.key_allows("port-forwarding"):
            return refuse("port forwarding is disabled for this key")
        allowed = self.key.permitlisten if self.key is not None else None
        if allowed is not None and not any(p in (0, listen_port) and h in (None, listen_host)
                                           for h, p in allowed):
            return refuse(f"{listen_host}:{listen_port} is not in this key's permitlisten")
        if 0 < listen_port < 1024:
            return refuse("ports below 1024 are privileged")

        async def listen() -> object:
            assert self.conn is not None
            try:
                await self.ctx.ensure(self.user)
                listener = await self.ctx.backend.listen_tcp(self.user.name, listen_port)
            except GatewayError as exc:
                return refuse(exc.user_message)
            if self.gone:  # she left while it was made: nobody would close it
                listener.close()
                return refuse("the connection ended")
            forward = await RemoteForward(self.conn, listener, listen_host,
                                          on_close=self._remote.discard).start()
            self._remote.add(forward)
            log.info("[%s] remote forward: user=%s %s:%s -> client", self.tag, self.user.name,
                     listen_host, forward.get_port())
            self.ctx.events.emit("forward.open", conn=self.id, user=self.user.name,
                                 host=listen_host, port=forward.get_port(), direction="remote",
                                 target="client")
            return forward

        return listen()

    # --- agent forwarding -----------------------------------------------------------------

    async def _agent_forwarding_requested(self) -> bool:
        """The client asked for `ssh -A`; the socket is made once a session needs it."""
        allowed = self.ctx.config.allow_agent_forwarding and self.key_allows(
            "agent-forwarding")
        if not allowed:
            reason = ("agent forwarding is disabled on this gateway"
                      if not self.ctx.config.allow_agent_forwarding
                      else "agent forwarding is disabled for this key")
            log.info("[%s] agent forwarding refused for %s: %s", self.tag, self.user.name,
                     reason)
            self.ctx.events.emit("agent.refused", conn=self.id, user=self.user.name,
                                 reason=reason)
            return False
        self.agent_requested = True
        return True

    async def agent_socket(self) -> str | None:
        """SSH_AUTH_SOCK in her environment for this connection's sessions, or None."""
        if not self.agent_requested or self.conn is None:
            return None
        async with self._agent_lock:
            if self._agent is None:
                listener = await self.ctx.backend.listen_unix(self.user.name, "agent.sock")
                if self.gone:  # as for -R: made after the connection ended
                    listener.close()
                    return None
                self._agent = await AgentRelay(self.conn, listener).start()
                self.ctx.events.emit("agent.forward", conn=self.id, user=self.user.name,
                                     path=self._agent.path)
        return self._agent.path
