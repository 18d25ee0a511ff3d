"""Certificate policy: which OpenSSH user certificates log in, and why the others do not.

Every key a client offers passes `CertPolicy.screen` before asyncssh sees it.  A plain key is
only checked against revoked_keys (then our ``validate_public_key`` hook matches it).  A
certificate logs in as a user when

* it is a user certificate signed by a CA the user trusts: a ``cert-authority`` line in her
  ``keys:`` or a ``trusted_user_ca_keys`` CA of the gateway;
* neither the certificate (serial, key id), nor its key, nor its CA is in revoked_keys;
* now is inside its validity window;
* it names a principal she accepts: the line's ``principals=`` (else her name) for a
  cert-authority line, her ``principals:`` (else her name) for a gateway CA;
* its ``source-address``, and the line's ``from=`` and ``expiry-time``, admit the client;
* its ``force-command`` does not contradict the line's ``command=`` (sshd refuses that too).

The verdict is then handed to asyncssh as one ``cert-authority,principals=...`` line, so its
own checks (signature, validity, principals) agree, and it enforces the certificate's
``permit-*`` extensions and ``force-command`` together with the line's ``no-*`` options: the
stricter wins.  A certificate that expires mid-session does not end the session (as in sshd):
validity is checked at login only.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asyncssh import SSHAuthorizedKeys, SSHKey, import_authorized_keys
from asyncssh.public_key import KeyImportError, decode_ssh_certificate, decode_ssh_public_key

from ..auth import AuthorizedKey
from ..config import GatewayConfig, User
from ..krl import KRLError, Revocations, RevokedKeys, TrustedCA, WireReader

CERT_TYPE_USER = 1


class CertRefused(Exception):
    """A key or certificate that may not log in; ``reason`` is what the audit log gets."""

    def __init__(self, reason: str, cert: Certificate | None = None,
                 fingerprint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cert = cert  # the refused certificate, when it could be read
        self.fingerprint = cert.fingerprint if cert else fingerprint


@dataclass(frozen=True)
class Certificate:
    """What we read from an OpenSSH certificate (asyncssh keeps serial, key id and validity
    private, so they are decoded here from the wire blob)."""

    key: SSHKey  # the certified (plain) key
    ca: SSHKey
    key_id: str
    serial: int
    cert_type: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    options: Mapping[str, Any]  # asyncssh's decode: force-command, source-address, permit-*

    @property
    def ca_fingerprint(self) -> str:
        return self.ca.get_fingerprint()

    @property
    def fingerprint(self) -> str:
        return self.key.get_fingerprint()

    @property
    def force_command(self) -> str | None:
        command = self.options.get("force-command")
        return command if isinstance(command, str) else None

    def permits(self, what: str) -> bool:
        """``permit-pty``, ``permit-port-forwarding``, ``permit-agent-forwarding``..."""
        return bool(self.options.get(f"permit-{what}"))

    def audit(self) -> dict[str, Any]:
        """The fields auth events carry."""
        return {"cert_id": self.key_id, "cert_serial": self.serial,
                "cert_principals": list(self.principals), "ca": self.ca_fingerprint}


def _blob_type(key_data: bytes) -> str:
    try:
        return WireReader(key_data, "key").string().decode("ascii", "replace")
    except KRLError:
        return ""


def read_certificate(key_data: bytes) -> Certificate | None:
    """The certificate in an offered key blob; None for a plain key; CertRefused if broken."""
    kind = _blob_type(key_data)
    if kind.startswith("x509v3-"):
        raise CertRefused("X.509 certificates are not supported")
    if not kind.endswith("-cert-v01@openssh.com"):
        return None
    try:
        cert = decode_ssh_certificate(key_data)
    except KeyImportError as exc:
        raise CertRefused(f"invalid certificate ({exc})") from None
    try:
        r = WireReader(key_data, "certificate")
        r.string(), r.string()  # type, nonce
        fields = WireReader(cert.key.public_data, "key")
        fields.string()  # the plain key's type; its other fields follow the nonce
        while fields:
            fields.string()
            r.string()
        serial, cert_type = r.uint64(), r.uint32()
        key_id = r.string().decode("utf-8", "replace")
        r.string()  # principals: asyncssh's decode is used
        valid_after, valid_before = r.uint64(), r.uint64()
    except KRLError as exc:
        raise CertRefused(f"invalid certificate ({exc})") from None
    return Certificate(key=cert.key, ca=cert.signing_key, key_id=key_id, serial=serial,
                       cert_type=cert_type, principals=tuple(cert.principals),
                       valid_after=valid_after, valid_before=valid_before,
                       options=dict(cert.options))


@dataclass(frozen=True)
class Verdict:
    """A screened offer: for a certificate, the matched cert-authority line (None for a
    gateway CA) and the authorized keys asyncssh should trust for it."""

    cert: Certificate | None = None
    entry: AuthorizedKey | None = None
    authorized: SSHAuthorizedKeys | None = None


def _peer_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def _line(ca: SSHKey, principals: Sequence[str]) -> str:
    """The authorized_keys line asyncssh gets for a gateway CA (principals are checked to
    hold no commas or quotes when users.yaml is loaded)."""
    key = ca.export_public_key().decode().strip()
    return f'cert-authority,principals="{",".join(principals)}" {key}'


class CertPolicy:
    """The gateway's CA and revocation settings, applied to each offered key."""

    def __init__(self, config: GatewayConfig) -> None:
        self.cas: tuple[TrustedCA, ...] = config.trusted_user_ca_keys
        self.revoked = RevokedKeys(config.revoked_keys) if config.revoked_keys else None

    def _revocations(self) -> Revocations | None:
        if self.revoked is None:
            return None
        current = self.revoked.refresh()
        if current is None:  # fail closed, as sshd does
            raise CertRefused(f"revoked_keys unusable ({self.revoked.error})")
        return current

    def screen(self, key_data: bytes, user: User | None, username: str, peer: str,
               now: float | None = None) -> Verdict:
        """Refuse (CertRefused) or let through one offered key or certificate."""
        cert = read_certificate(key_data)
        if cert is None:
            try:
                key = decode_ssh_public_key(key_data)
            except KeyImportError:
                return Verdict()  # asyncssh refuses it; nothing to revoke
            revoked = self._revocations()
            if revoked is not None and revoked.key_revoked(key.public_data):
                raise CertRefused("revoked key", fingerprint=key.get_fingerprint())
            return Verdict()
        try:
            return self._check(cert, user, username, peer, now)
        except CertRefused as exc:
            exc.cert, exc.fingerprint = cert, cert.fingerprint
            raise

    def _check(self, cert: Certificate, user: User | None, username: str, peer: str,
               now: float | None) -> Verdict:
        if user is None:
            raise CertRefused("unknown user")
        if user.disabled:
            raise CertRefused("disabled user")
        if cert.cert_type != CERT_TYPE_USER:
            raise CertRefused("not a user certificate (a host certificate)")
        entries = [k for k in user.keys
                   if k.cert_authority and k.key.public_data == cert.ca.public_data]
        gateway_ca = any(ca.key.public_data == cert.ca.public_data for ca in self.cas)
        if not entries and not gateway_ca:
            raise CertRefused("untrusted CA")
        revoked = self._revocations()
        if revoked is not None:
            if revoked.key_revoked(cert.ca.public_data):
                raise CertRefused("revoked CA")
            if revoked.key_revoked(cert.key.public_data):
                raise CertRefused("revoked key")
            hit = revoked.cert_revoked(cert.ca.public_data, cert.serial, cert.key_id)
            if hit:
                raise CertRefused(f"revoked certificate ({hit})")
        now = time.time() if now is None else now
        if now < cert.valid_after:
            raise CertRefused("certificate not yet valid")
        if now >= cert.valid_before:
            raise CertRefused("certificate expired")
        if not cert.principals:
            raise CertRefused("certificate names no principals")
        addr = _peer_address(peer)
        networks = cert.options.get("source-address") or ()
        if networks and (addr is None or not any(addr in net for net in networks)):
            raise CertRefused("source-address does not match peer")
        reason = "wrong principal"
        for entry in entries:
            allowed = entry.principals or (username,)
            if not set(allowed) & set(cert.principals):
                reason = (f"wrong principal (certificate names {', '.join(cert.principals)}; "
                          f"this cert-authority line accepts {', '.join(allowed)})")
            elif entry.is_expired():
                reason = "cert-authority line expired"
            elif not entry.matches_peer(peer):
                reason = "from= does not match peer"
            elif cert.force_command is not None and entry.forced_command is not None \
                    and cert.force_command != entry.forced_command:
                reason = "certificate force-command conflicts with the line's command="
            else:
                return Verdict(cert, entry, import_authorized_keys(entry.text))
        if gateway_ca:
            allowed = user.cert_principals
            if set(allowed) & set(cert.principals):
                return Verdict(cert, None, import_authorized_keys(_line(cert.ca, allowed)))
            if not entries:
                reason = (f"wrong principal (certificate names {', '.join(cert.principals)}; "
                          f"{user.name} accepts {', '.join(allowed)})")
        raise CertRefused(reason)
