"""users.yaml: defaults, users, their keys and limits, into frozen objects."""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from asyncssh import SSHKey

from ..auth import (
    AuthorizedKey,
    check_password_hash,
    check_principal,
    match_key,
    parse_authorized_key,
)
from .convert import (
    Converter,
    _absolute_path,
    _boolean,
    _cpus_value,
    _disk_value,
    _int_value,
    _memory_value,
    _parsed,
    _read_mapping,
    _string,
    _unlimited,
    parse_duration,
)
from .tree import _BAD, _decode, _Errors, _Node, _parse_tree, _read_text


class GatewayDefaults(Protocol):
    """The gateway-wide values a user's settings fall back to (a `GatewayConfig`)."""

    idle_timeout: float | None
    max_sessions: int


class Inherit(enum.Enum):
    """Marks a per-user setting that falls back to the gateway-wide value."""

    INHERIT = "inherit"

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT = Inherit.INHERIT
USER_NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

@dataclass(frozen=True)
class UserDefaults:
    """The ``defaults:`` block: limits applied to every user that does not set its own."""

    cpus: float | None = None
    memory: int | None = None
    pids: int | None = None
    disk: int | None = None
    disabled: bool = False
    idle_timeout: float | None | Inherit = INHERIT
    max_sessions: int | None = None
    shell: str | None = None


@dataclass(frozen=True)
class User:
    """One user's effective settings (own value, else ``defaults:``, else built-in).

    ``cpus``/``memory``/``pids``/``disk`` None mean unlimited. ``idle_timeout`` is seconds, None for
    never, or INHERIT (use GatewayConfig.idle_timeout); ``max_sessions`` None means the
    gateway default. Use ``effective_*`` to resolve those against a GatewayConfig.
    """

    name: str
    keys: tuple[AuthorizedKey, ...] = ()
    cpus: float | None = None
    memory: int | None = None
    pids: int | None = None
    disk: int | None = None  # bytes of home + image cache (a loop-mounted ext4 image)
    disabled: bool = False
    password: str | None = None
    idle_timeout: float | None | Inherit = INHERIT
    max_sessions: int | None = None
    shell: str | None = None
    line: int | None = None
    principals: tuple[str, ...] = ()  # certificate principals from trusted_user_ca_keys

    @property
    def cert_principals(self) -> tuple[str, ...]:
        """Principals a certificate from a trusted_user_ca_keys CA must name (one of): her
        ``principals:``, by default her own name (sshd's AuthorizedPrincipalsFile)."""
        return self.principals or (self.name,)

    @property
    def has_password_auth(self) -> bool:
        """Whether a password hash is configured (password login possible)."""
        return self.password is not None

    @property
    def can_log_in(self) -> bool:
        """False for disabled users and users with neither keys nor a password."""
        return not self.disabled and (bool(self.keys) or self.has_password_auth)

    def effective_idle_timeout(self, gateway: GatewayDefaults) -> float | None:
        """Idle timeout in seconds for this user (None = never)."""
        if self.idle_timeout is INHERIT:
            return gateway.idle_timeout
        return self.idle_timeout

    def effective_max_sessions(self, gateway: GatewayDefaults) -> int:
        """Concurrent session limit for this user."""
        return self.max_sessions if self.max_sessions is not None else gateway.max_sessions

    def find_key(self, key: SSHKey, peer_ip: str, now: datetime | None = None,
                 ) -> AuthorizedKey | None:
        """First entry for this key that the peer may use now (from= and expiry-time)."""
        return match_key(self.keys, key, peer_ip, now)[0]


@dataclass(frozen=True)
class UsersConfig:
    """A loaded users.yaml. ``digest`` (sha256 of the bytes) tells a reloader if it changed."""

    path: Path | None
    users: Mapping[str, User]
    defaults: UserDefaults = field(default_factory=UserDefaults)
    digest: str = ""
    mtime_ns: int | None = None

    def user(self, name: str) -> User | None:
        """Look a user up by login name."""
        return self.users.get(name)

    @functools.cached_property
    def has_passwords(self) -> bool:
        """Whether any user has a password hash (password auth is offered only then)."""
        return any(u.has_password_auth for u in self.users.values())


_LIMIT_SPEC: dict[str, Converter] = {
    "cpus": _parsed(_unlimited(_cpus_value), what="a number of CPUs or 'unlimited'"),
    "memory": _parsed(_unlimited(_memory_value), what="a size like 4g or 'unlimited'"),
    "pids": _parsed(_unlimited(_int_value(10)), what="a whole number or 'unlimited'"),
    "disk": _parsed(_unlimited(_disk_value), what="a size like 20g or 'unlimited'"),
    "disabled": _boolean,
    "idle_timeout": _parsed(parse_duration, what="a duration like 30m or 'never'"),
    "max_sessions": _parsed(_int_value(1), what="a whole number"),
    "shell": _string(check=_absolute_path),
}


def _keys(node: _Node, field: str, errs: _Errors) -> Any:
    if node.kind == "scalar" and node.value is None:
        return ()
    items = [node] if node.kind == "scalar" else node.value if node.kind == "seq" else None
    if items is None:
        errs.add(node, field, "must be a list of public key lines")
        return _BAD
    keys: list[AuthorizedKey] = []
    for i, item in enumerate(items):
        item_field = f"{field}[{i}]" if node.kind == "seq" else field
        if item.invalid:
            continue
        if item.kind != "scalar" or not isinstance(item.value, str):
            hint = ""
            if item.kind == "map":  # YAML read `command="a: b" ssh-...` as a mapping
                hint = "; if the line contains ': ' or ' #', wrap it in single quotes"
            errs.add(item, item_field, f"each key must be one authorized_keys line{hint}")
            continue
        try:
            keys.append(parse_authorized_key(item.value, item.line))
        except ValueError as exc:
            errs.add(item, item_field, str(exc))
    return tuple(keys)


def _principals(node: _Node, field: str, errs: _Errors) -> Any:
    items = [node] if node.kind == "scalar" else node.value if node.kind == "seq" else None
    if items is None or not items or (node.kind == "scalar" and node.value is None):
        errs.add(node, field, "must be a principal name or a non-empty list of them")
        return _BAD
    out: list[str] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if node.kind == "seq" else field
        if item.invalid:
            continue
        value = item.value if item.kind == "scalar" else None
        text = value if isinstance(value, str) else item.raw if value is not None else None
        try:
            if text is None:
                raise ValueError("must be a principal name")
            check_principal(text)
        except ValueError as exc:
            errs.add(item, where, str(exc))
            continue
        out.append(text)
    return tuple(out)


_USER_SPEC: dict[str, Converter] = {
    **_LIMIT_SPEC,
    "principals": _principals,
    "keys": _keys,
    "password": _string(nullable=True, check=check_password_hash),
}
_DEFAULTS_FORBIDDEN = {
    name: f"{name} is per-user and cannot be set in defaults"
    for name in ("keys", "password", "principals")
}


def _build_user(name: str, settings: Mapping[str, Any], defaults: UserDefaults,
                line: int | None) -> User:
    def pick(key: str) -> Any:
        return settings[key] if key in settings else getattr(defaults, key)

    return User(
        name=name,
        keys=settings.get("keys", ()),
        cpus=pick("cpus"),
        memory=pick("memory"),
        pids=pick("pids"),
        disk=pick("disk"),
        disabled=pick("disabled"),
        password=settings.get("password"),
        idle_timeout=pick("idle_timeout"),
        max_sessions=pick("max_sessions"),
        shell=pick("shell"),
        line=line,
        principals=settings.get("principals", ()),
    )


def parse_users(text: str, path: Path | None = None, *, mtime_ns: int | None = None,
                ) -> UsersConfig:
    """Validate users.yaml text into a new UsersConfig, or raise ConfigError(s)."""
    errs = _Errors(str(path) if path is not None else "<users>")
    tree = _parse_tree(text, errs)
    defaults = UserDefaults()
    users: dict[str, User] = {}
    if tree is not None and not (tree.kind == "scalar" and tree.value is None):
        if tree.kind != "map":
            errs.add(tree, None, "users file must be a mapping with defaults: and users:")
        top = _read_mapping(tree, "", {"defaults": _keep, "users": _keep}, errs) or {}
        d_node = top.get("defaults")
        if d_node is not None and not _is_null(d_node):
            values = _read_mapping(d_node, "defaults", _LIMIT_SPEC, errs, _DEFAULTS_FORBIDDEN)
            defaults = UserDefaults(**(values or {}))
        u_node = top.get("users")
        if u_node is not None and not _is_null(u_node):
            if u_node.kind != "map":
                errs.add(u_node, "users", "must be a mapping of user name to settings")
            else:
                for name, node in u_node.value.items():
                    field_name = f"users.{name}"
                    if not USER_NAME_RE.fullmatch(name):
                        errs.add(node.key_line, field_name,
                                 f"invalid user name {name!r}: use 1-32 characters, lower-case "
                                 "letters, digits, '_' and '-', starting with a letter or '_'")
                        continue
                    if _is_null(node):
                        settings: dict[str, Any] | None = {}
                    elif node.kind != "map":
                        errs.add(node, field_name,
                                 "must be a mapping of settings (keys:, memory:, ...)")
                        continue
                    else:
                        settings = _read_mapping(node, field_name, _USER_SPEC, errs)
                    if settings is not None:
                        users[name] = _build_user(name, settings, defaults, node.key_line)
    errs.check()
    digest = hashlib.sha256(text.encode()).hexdigest()
    return UsersConfig(
        path=path,
        users=MappingProxyType(users),
        defaults=defaults,
        digest=digest,
        mtime_ns=mtime_ns,
    )


def load_users(path: Path) -> UsersConfig:
    """Read and validate users.yaml; raise ConfigError(s) and never return a partial result."""
    data, mtime_ns = _read_text(path)
    config = parse_users(_decode(data, str(path)), path, mtime_ns=mtime_ns)
    # Hash the bytes, not the decoded text, so any on-disk change is noticed.
    return replace(config, digest=hashlib.sha256(data).hexdigest())


def _keep(node: _Node, field: str, errs: _Errors) -> Any:
    return node


def _is_null(node: _Node) -> bool:
    return node.kind == "scalar" and node.value is None


