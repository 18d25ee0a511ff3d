"""Who may log in, and with what: authorized_keys lines and password hashes.

Each key line of users.yaml is parsed on its own (asyncssh's importer silently skips lines it
cannot parse, and accepts unknown options) so an admin gets a precise error, and the options
asyncssh parses but does not enforce (`restrict`, `expiry-time`) are enforced here.  The
matching itself — key, `from=`, expiry — is `match_key()`, which the server calls for every
offered key so that every failure can be logged with its reason.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from asyncssh import SSHKey
from asyncssh.auth_keys import _SSHAuthorizedKeyEntry
from asyncssh.misc import OptionsParser
from asyncssh.pattern import HostPatternList
from asyncssh.public_key import (
    KeyImportError,
    get_certificate_algs,
    get_public_key_algs,
    import_public_key,
)
from passlib.context import CryptContext
from passlib.exc import MissingBackendError


def parse_port(text: str, *, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range ({low}-65535)")
    return port



_FLAG_OPTIONS = frozenset({
    "restrict", "pty", "no-pty", "port-forwarding", "no-port-forwarding",
    "agent-forwarding", "no-agent-forwarding", "x11-forwarding", "no-x11-forwarding",
    "user-rc", "no-user-rc", "no-touch-required", "verify-required", "cert-authority",
})
_VALUE_OPTIONS = frozenset({"command", "environment", "expiry-time", "from", "permitlisten",
                            "permitopen", "principals"})
_UNSUPPORTED_OPTIONS = {
    "tunnel": "tun device forwarding is not supported",
}
# what a principal may be: it is written into principals="a,b" lines, so no separators
PRINCIPAL_RE = re.compile(r'[^\s,"\\]+')
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPIRY_RE = re.compile(r"(\d{8}|\d{12}|\d{14})Z?")


def _algorithms(algs: list[bytes]) -> frozenset[str]:
    return frozenset(a.decode() for a in algs)


_KEY_TYPES = _algorithms(get_public_key_algs())
_CERT_TYPES = _algorithms(get_certificate_algs())


def _parse_expiry(value: str) -> datetime:
    """OpenSSH's ``YYYYMMDD[HHMM[SS]][Z]``, always taken as UTC so the host's TZ can't matter."""
    if not _EXPIRY_RE.fullmatch(value):
        raise ValueError(f'expiry-time="{value}" must be YYYYMMDD, YYYYMMDDHHMM or '
                         "YYYYMMDDHHMMSS (UTC)")
    digits = value.rstrip("Z").ljust(14, "0")
    try:
        return datetime.strptime(digits, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f'expiry-time="{value}" is not a real date/time') from None


def _check_from(value: str) -> None:
    patterns = value.split(",")
    if any(not p.lstrip("!") for p in patterns):
        raise ValueError(f'from="{value}" has an empty pattern')
    for pattern in patterns:
        pattern = pattern.lstrip("!")
        if "/" not in pattern:
            continue
        try:
            ipaddress.ip_network(pattern)
        except ValueError:
            try:
                net = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                raise ValueError(f"from= pattern {pattern!r} is not a valid CIDR block") from None
            # asyncssh would silently treat it as a wildcard that never matches
            raise ValueError(f"from= pattern {pattern!r} has host bits set; did you mean "
                             f"{net}?") from None
    if all(p.startswith("!") for p in patterns):
        raise ValueError(f'from="{value}" only has negated patterns, so it matches nobody; '
                         "add a positive pattern, e.g. from=\"*,!1.2.3.4\"")


def _check_permitopen(value: str) -> None:
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f'permitopen="{value}" must be host:port')
    if port != "*":
        parse_port(port, allow_zero=False)


def _check_permitlisten(value: str) -> None:
    _, _, port = value.rpartition(":")
    if port != "*":
        try:
            parse_port(port, allow_zero=False)
        except ValueError:
            raise ValueError(f'permitlisten="{value}" must be [host:]port') from None


def _diagnose_key(text: str) -> str:
    """Say why a ``type base64 [comment]`` part did not import (asyncssh's text is vague)."""
    parts = text.split()
    if not parts:
        return "no public key after the options"
    kind = parts[0]
    if kind in _CERT_TYPES:
        return _CERT_AS_KEY
    if kind not in _KEY_TYPES:
        return (f"{kind!r} is not a public key type; expected a line like "
                "'[options] ssh-ed25519 AAAA... comment'")
    if len(parts) < 2:
        return f"missing the base64 key data after {kind!r}"
    try:
        blob = binascii.a2b_base64(parts[1].encode(), strict_mode=True)
    except (binascii.Error, ValueError):
        return "the key data is not valid base64 (was the line cut or wrapped?)"
    size = int.from_bytes(blob[:4], "big")
    inner = blob[4:4 + size].decode("ascii", "replace") if len(blob) >= 4 + size else ""
    if inner and inner != kind:
        return f"the key data holds a {inner} key but the line says {kind}"
    try:
        import_public_key(f"{kind} {parts[1]}")
    except KeyImportError as exc:
        return f"invalid {kind} key data ({exc}); is it truncated? copy the whole .pub line"
    return "unrecognized key line"


_CERT_AS_KEY = ("a certificate cannot be listed as a key: trust the CA that signs it "
                "(cert-authority ... <CA public key>, or trusted_user_ca_keys in gateway.yaml), "
                "or list the plain public key")


def check_principal(name: str) -> None:
    """A principal name as it may appear in a certificate and in principals="..."."""
    if not PRINCIPAL_RE.fullmatch(name):
        raise ValueError(f"principal {name!r} must be non-empty, without blanks, commas, "
                         "quotes or backslashes")


def _options_end(text: str) -> int:
    """Index where the options prefix ends: the first unquoted, unescaped blank."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch in " \t" and not quoted:
            return i
    return len(text)


def _key_part(text: str) -> tuple[dict[str, Any], str]:
    """Split a line into raw options (values as written) and the key part, like OpenSSH."""
    if text.split(None, 1)[0] in _KEY_TYPES | _CERT_TYPES:
        return {}, text
    end = _options_end(text)
    parser = OptionsParser()
    parser._parse_options(text[:end])  # asyncssh's own tokenizer, but keeping raw values
    return parser.options, text[end:].strip()


@dataclass(frozen=True)
class AuthorizedKey:
    """One authorized_keys line, parsed; helpers answer what the key's options allow.

    ``options`` is asyncssh's own parse (``from`` holds asyncssh HostPatternList objects,
    ``permitopen`` a set of (host, port|None), ``environment`` a dict). asyncssh does not
    enforce ``restrict`` or ``expiry-time``, so use the properties here rather than raw options.
    """

    text: str
    line: int | None
    key: SSHKey
    fingerprint: str
    comment: str | None
    options: Mapping[str, Any]
    expires_at: datetime | None
    restrict: bool

    def _allows(self, what: str) -> bool:
        # A "no-" flag always wins; with restrict, only an explicit re-enable allows it.
        if self.options.get(f"no-{what}"):
            return False
        return not self.restrict or bool(self.options.get(what))

    @property
    def cert_authority(self) -> bool:
        """A ``cert-authority`` line: its key is a CA whose user certificates log in."""
        return bool(self.options.get("cert-authority"))

    @property
    def principals(self) -> tuple[str, ...] | None:
        """``principals=`` of a cert-authority line (None: the certificate must name the
        user herself, as in OpenSSH)."""
        raw, _ = _key_part(self.text)
        values = raw.get("principals")
        if not values:
            return None
        return tuple(p for value in values for p in value.split(","))

    @property
    def allows_pty(self) -> bool:
        """Whether this key may request a terminal."""
        return self._allows("pty")

    @property
    def allows_port_forwarding(self) -> bool:
        """Whether this key may use ``ssh -L`` at all (see also ``permitopen``)."""
        return self._allows("port-forwarding")

    @property
    def allows_agent_forwarding(self) -> bool:
        """Whether this key may forward the client's ssh-agent (``ssh -A``)."""
        return self._allows("agent-forwarding")

    @property
    def permitlisten(self) -> list[tuple[str | None, int]] | None:
        """Allowed ``ssh -R`` listen ports (host None: any); None means no restriction."""
        values = self.options.get("permitlisten")
        if values is None:
            return None
        out = []
        for value in values:
            host, _, port = value.rpartition(":")
            out.append((host or None, 0 if port == "*" else int(port)))
        return out

    @property
    def forced_command(self) -> str | None:
        """The ``command=`` to run instead of whatever the client asked for."""
        command = self.options.get("command")
        return command if isinstance(command, str) else None

    @property
    def environment(self) -> dict[str, str]:
        """Variables from ``environment=`` options."""
        return dict(self.options.get("environment") or {})

    @property
    def permitopen(self) -> list[tuple[str, int | None]] | None:
        """Allowed ``ssh -L`` destinations (port None means any); None means no restriction."""
        opens = self.options.get("permitopen")
        if opens is None:
            return None
        return sorted(opens, key=lambda hp: (hp[0], -1 if hp[1] is None else hp[1]))

    @property
    def from_patterns(self) -> tuple[str, ...]:
        """The ``from=`` values as written (all of them must match)."""
        raw, _ = _key_part(self.text)
        return tuple(raw.get("from", ()))

    def is_expired(self, now: datetime | None = None) -> bool:
        """Whether ``expiry-time`` has passed; a naive ``now`` is taken as UTC."""
        if self.expires_at is None:
            return False
        now = now or datetime.now(UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return now >= self.expires_at

    def matches_peer(self, ip: str) -> bool:
        """Whether the client address satisfies ``from=`` (CIDR, wildcards, ``!negation``).

        Host-name patterns never match: we do no reverse DNS (like OpenSSH's UseDNS=no).
        """
        patterns: list[HostPatternList] = self.options.get("from") or []
        if not patterns:
            return True
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            addr = None
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped  # dual-stack listeners report ::ffff:10.1.2.3
        text = str(addr) if addr is not None else ip
        return all(p.matches("", text, addr) for p in patterns)


def parse_authorized_key(text: str, line: int | None = None) -> AuthorizedKey:
    """Parse one authorized_keys line strictly; raise ValueError saying what is wrong.

    Stricter than asyncssh (which accepts unknown options and skips bad lines) because a typo
    like ``no-ptty`` must not silently grant a terminal.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty key line")
    if "\n" in text or "\r" in text:
        raise ValueError("one key per list item; this entry spans several lines")
    if text.startswith("#"):
        raise ValueError("key line is a comment; delete it or use a YAML # comment")
    try:
        raw_options, key_text = _key_part(text)
    except ValueError as exc:
        raise ValueError(f"bad options: {exc}") from None
    if not key_text or key_text.split()[0] not in _KEY_TYPES | _CERT_TYPES:
        raise ValueError(_diagnose_key(key_text))  # not a key line at all: say so first
    for name, value in raw_options.items():
        if name in _UNSUPPORTED_OPTIONS:
            raise ValueError(f"option {name!r}: {_UNSUPPORTED_OPTIONS[name]}")
        if name.lower() != name and name.lower() in _FLAG_OPTIONS | _VALUE_OPTIONS:
            raise ValueError(f"option {name!r} must be written in lower case "
                             f"({name.lower()!r}): asyncssh matches option names exactly")
        if name in _FLAG_OPTIONS:
            if value is not True:
                raise ValueError(f"option {name!r} takes no value")
        elif name in _VALUE_OPTIONS:
            if value is True:
                raise ValueError(f'option {name!r} needs a value, e.g. {name}="..."')
        else:
            allowed = ", ".join(sorted(_FLAG_OPTIONS | _VALUE_OPTIONS))
            raise ValueError(f"unknown option {name!r}; allowed: {allowed}")
    if key_text.split()[0] in _CERT_TYPES:
        raise ValueError(_CERT_AS_KEY)
    if "principals" in raw_options and "cert-authority" not in raw_options:
        raise ValueError("principals= only applies to cert-authority lines")
    for value in raw_options.get("principals", ()):
        for name in value.split(","):
            try:
                check_principal(name)
            except ValueError as exc:
                raise ValueError(f'principals="{value}": {exc}') from None
    if len(raw_options.get("command", ())) > 1:
        raise ValueError("command= is given more than once")
    for value in raw_options.get("from", ()):
        _check_from(value)
    for value in raw_options.get("permitopen", ()):
        _check_permitopen(value)
    for value in raw_options.get("permitlisten", ()):
        _check_permitlisten(value)
    for value in raw_options.get("environment", ()):
        name = value.split("=", 1)[0]
        if "=" not in value or not _ENV_NAME_RE.fullmatch(name):
            raise ValueError(f'environment="{value}" must be NAME=value')
    expiries = [_parse_expiry(v) for v in raw_options.get("expiry-time", ())]

    try:
        entry = _SSHAuthorizedKeyEntry(text)
    except KeyImportError:
        raise ValueError(_diagnose_key(key_text)) from None
    except ValueError as exc:
        raise ValueError(f"bad options: {exc}") from None
    if entry.key is None:
        raise ValueError("X.509 certificates and subjects are not supported; "
                         "list a plain OpenSSH public key")
    if entry.key.get_algorithm() == "ssh-dss":
        raise ValueError("DSA (ssh-dss) keys are insecure and not accepted; use ssh-ed25519")
    comment = entry.key.get_comment()
    return AuthorizedKey(
        text=text,
        line=line,
        key=entry.key,
        fingerprint=entry.key.get_fingerprint(),
        comment=comment,
        options=MappingProxyType(dict(entry.options)),
        expires_at=min(expiries) if expiries else None,  # earliest wins, as in OpenSSH
        restrict=bool(entry.options.get("restrict")),
    )


# --------------------------------------------------------------------------------------------
# Passwords

_PASSWORD_SCHEMES = ["bcrypt", "sha512_crypt", "sha256_crypt", "argon2"]
_PASSWORD_CONTEXT = CryptContext(schemes=_PASSWORD_SCHEMES)
_PLAINTEXT_MESSAGE = "password must be a hash made by `dind-gateway hash-password`, not plaintext"


def check_password_hash(text: str) -> None:
    """Refuse anything but a supported hash: plaintext in users.yaml is an error."""
    scheme = _PASSWORD_CONTEXT.identify(text)
    if scheme is None:
        if text.startswith("$"):
            raise ValueError(f"{_PLAINTEXT_MESSAGE} (unsupported hash type; accepted: "
                             f"{', '.join(_PASSWORD_SCHEMES)})")
        raise ValueError(_PLAINTEXT_MESSAGE)
    try:
        parsed = _PASSWORD_CONTEXT.handler(scheme).from_string(text)
    except MissingBackendError:
        return  # identify() already matched its format; verifying needs the backend later
    except ValueError as exc:
        raise ValueError(f"malformed {scheme} hash: {exc}") from None
    if getattr(parsed, "checksum", "x") is None:
        raise ValueError(f"incomplete {scheme} hash (salt/settings only, no checksum)")


def verify_password(password: str, hashed: str) -> bool:
    """Check a password against a configured hash (slow by design: call it off the loop)."""
    try:
        return bool(_PASSWORD_CONTEXT.verify(password, hashed))
    except (ValueError, MissingBackendError):
        return False


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """A hash for users.yaml's `password:` field."""
    return _PASSWORD_CONTEXT.handler(scheme).hash(password)


def match_key(keys: Sequence[AuthorizedKey], key: SSHKey, peer_ip: str,
              now: datetime | None = None) -> tuple[AuthorizedKey | None, str]:
    """The entry that lets this key in from this peer now, else None and why not."""
    now = now or datetime.now(UTC)
    reason = "key not authorized"
    for entry in keys:
        if entry.cert_authority or entry.key.public_data != key.public_data:
            continue  # a CA key vouches for certificates, it does not log in by itself
        if entry.is_expired(now):
            reason = "key expired"
        elif not entry.matches_peer(peer_ip):
            reason = "from= does not match peer"
        else:
            return entry, ""
    return None, reason
