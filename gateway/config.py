"""Load and validate gateway.yaml and users.yaml into frozen dataclasses.

Admins edit these files by hand and users.yaml is live-reloaded, so every problem must be
reported as ``file:line: field: message`` and a bad file must never half-apply. We therefore
compose the YAML into nodes (keeping line numbers), walk them ourselves (PyYAML silently
keeps the last of duplicate keys; we reject them) and build new immutable objects; the
caller swaps the whole object in only when loading succeeded.
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import functools
import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from asyncssh import SSHKey
from yaml.constructor import ConstructorError, SafeConstructor

from .auth import (
    AuthorizedKey,
    check_password_hash,
    match_key,
    parse_authorized_key,
    parse_port,
)

__all__ = [
    "INHERIT",
    "Address",
    "AuthorizedKey",
    "ConfigError",
    "ConfigErrors",
    "ForwardRule",
    "GatewayConfig",
    "Inherit",
    "User",
    "UserDefaults",
    "UsersConfig",
    "load_gateway_config",
    "load_users",
    "parse_address",
    "parse_authorized_key",
    "parse_duration",
    "parse_gateway_config",
    "parse_size",
    "parse_users",
]

# --------------------------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """A config problem, located precisely enough that an admin can fix it without guessing."""

    def __init__(
        self, path: str | os.PathLike[str] | None, line: int | None, field: str | None,
        message: str,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
        elif self.line is not None:
            where = f"line {self.line}"
        parts = [p for p in (where, self.field) if p]
        return ": ".join([*parts, self.message])


class ConfigErrors(ConfigError):
    """Several problems at once, so one reload attempt shows the admin everything to fix.

    Its own path/line/field/message are those of the first (earliest) error.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        self.errors = tuple(errors)
        first = self.errors[0]
        super().__init__(first.path, first.line, first.field, first.message)

    def __str__(self) -> str:
        return "\n".join(ConfigError.__str__(e) for e in self.errors)


# --------------------------------------------------------------------------------------------
# Scalar parsers (plain ValueError; the loaders attach file/line/field)

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


def parse_size(value: object) -> int:
    """Turn ``4g``/``512m``/``1.5g``/``1024k``/bytes into bytes, with binary (1024) units.

    Binary units match what Docker means by ``--memory 4g``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a size like 4g, 512m or a number of bytes, not {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"must be greater than zero, not {value}")
        return value
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"must be greater than zero, not {value!r}")
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{value!r} is not a size; use e.g. 4g, 512m, 1.5g, 1024k or bytes")
    number, unit = m.groups()
    factor = 1024 ** " kmgt".index(unit.lower() or " ")
    result = int(Decimal(number) * factor)
    if result <= 0:
        raise ValueError(f"must be greater than zero, not {value!r}")
    return result


def parse_duration(value: object, *, allow_never: bool = True) -> float | None:
    """Turn seconds or ``30s``/``15m``/``2h``/``1d``/``1h30m`` into seconds; ``never`` → None."""
    hint = "use seconds or e.g. 30s, 15m, 2h, 1d" + (", or never" if allow_never else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a duration ({hint}), not {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "never":
            if not allow_never:
                raise ValueError("'never' is not allowed here; give a duration")
            return None
        if text.startswith("-"):
            raise ValueError(f"must be greater than zero, not {value!r}")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            seconds = sum(
                float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text)
            )
        else:
            raise ValueError(f"{value!r} is not a duration; {hint}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be greater than zero, not {value!r}")
    return seconds


@dataclass(frozen=True)
class Address:
    """A host and port to listen on; ``str()`` gives it back in ``host:port`` form."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _split_host_port(value: str, example: str = "0.0.0.0:2222") -> tuple[str, str]:
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{value!r} must look like [::1]:2222")
        return host, rest[1:]
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"{value!r} has no port; write host:port, e.g. {example}")
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets, e.g. [{host}]:{port}")
    return host, port


def parse_address(value: object, *, allow_port_zero: bool = True) -> Address:
    """Parse ``host:port`` or ``[v6addr]:port``; port 0 (any free port) is handy in tests."""
    if not isinstance(value, str):
        raise ValueError(f"must be a quoted 'host:port' string, not {value!r}")
    host, port_text = _split_host_port(value.strip())
    port = parse_port(port_text, allow_zero=allow_port_zero)
    if not host:
        raise ValueError(f"{value!r} has no host; use 0.0.0.0 or [::] for all addresses")
    if value.strip().startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{host!r} is not a valid host name or address")
    return Address(host, port)


# --------------------------------------------------------------------------------------------
# YAML → located tree


@dataclass
class _Node:
    """A YAML value plus where it came from; mappings/sequences hold child _Nodes."""

    kind: Literal["scalar", "seq", "map"]
    value: Any
    line: int | None
    key_line: int | None = None
    invalid: bool = False  # already reported (bad tag, recursive alias): skip it
    raw: str | None = None  # scalar source text, so `banner: yes` can still mean the string
    origin: str | None = None  # set when the value came from overrides, not the file

    @property
    def where(self) -> int | None:
        """Line to blame: the value for scalars, the key for empty values and collections."""
        if self.kind == "scalar" and self.value is not None and self.line is not None:
            return self.line
        return self.key_line if self.key_line is not None else self.line


class _Errors:
    """Collects problems so one load reports all of them, earliest first."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[ConfigError] = []

    def add(self, where: _Node | int | None, field: str | None, message: str) -> None:
        path = self.path
        if isinstance(where, _Node):
            path = where.origin or self.path
            where = where.where
        self.items.append(ConfigError(path, where, field, message))

    def check(self) -> None:
        if not self.items:
            return
        items = sorted(self.items, key=lambda e: (e.line is None, e.line or 0))
        raise items[0] if len(items) == 1 else ConfigErrors(items)


_BAD = object()  # a converter returns this after recording an error
_STD_TAG = "tag:yaml.org,2002:"
_KEY_LINE_RE = re.compile(r"^(\s*)(?:-\s+)?([\w.-]+|\"[^\"]*\"|'[^']*')\s*:(?:\s|$)")


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _field_near(text: str, line: int) -> str | None:
    """Best guess of the dotted field around a YAML syntax error, from indentation."""
    lines = text.splitlines()
    path: list[str] = []
    indent: int | None = None
    for i in range(min(line, len(lines)) - 1, -1, -1):
        m = _KEY_LINE_RE.match(lines[i].expandtabs(8))
        if not m:
            continue
        depth = len(m.group(1))
        if indent is None or depth < indent:
            path.append(m.group(2).strip("\"'"))
            indent = depth
            if depth == 0:
                break
    return ".".join(reversed(path)) or None


def _compose(text: str, errs: _Errors) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        problem, context = exc.problem or "", exc.context or ""
        mark = exc.problem_mark or exc.context_mark
        if "end of stream" in problem and exc.context_mark:
            mark = exc.context_mark  # e.g. an unclosed quote: blame where it was opened
        line = mark.line + 1 if mark else None
        ctx_line = exc.context_mark.line + 1 if exc.context_mark else None
        if context and ctx_line is not None and ctx_line != line:
            context += f" (line {ctx_line})"
        if problem.startswith("but "):
            detail = f"{context}, {problem}"
        else:
            detail = f"{problem} ({context})" if context and problem else problem or context
        message = f"YAML syntax error: {detail}"
        if "\\t" in problem or "\t" in problem:
            message += "; YAML does not allow tabs for indentation, use spaces"
        errs.add(line, _field_near(text, line) if line else None, message)
    except yaml.YAMLError as exc:
        errs.add(None, None, f"YAML error: {exc}")
    return None


def _tree(node: yaml.Node, field: str, errs: _Errors, active: set[int]) -> _Node:
    """Convert a composed node, rejecting duplicate keys, odd tags and recursive aliases."""
    line = node.start_mark.line + 1
    if id(node) in active:
        errs.add(line, field, "recursive YAML alias")
        return _Node("scalar", None, line, invalid=True)
    if isinstance(node, yaml.ScalarNode):
        try:
            value = SafeConstructor().construct_object(node, deep=True)
        except ConstructorError:
            errs.add(line, field, f"YAML tag {_short_tag(node.tag)} is not allowed here")
            return _Node("scalar", None, line, invalid=True)
        return _Node("scalar", value, line, raw=node.value)
    if node.tag not in (_STD_TAG + "seq", _STD_TAG + "map"):
        errs.add(line, field, f"YAML tag {_short_tag(node.tag)} is not allowed here")
    active.add(id(node))
    try:
        if isinstance(node, yaml.SequenceNode):
            items = [_tree(n, f"{field}[{i}]", errs, active) for i, n in enumerate(node.value)]
            return _Node("seq", items, line)
        entries: dict[str, _Node] = {}
        what = "user" if field == "users" else "key"
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "":
                errs.add(key_line, field or None, "mapping keys must be plain names")
                continue
            name = key_node.value
            sub = _dotted(field, name)
            if key_node.tag == _STD_TAG + "merge":
                errs.add(key_line, sub, "YAML merge keys (<<) are not supported")
                continue
            if name in entries:
                first = entries[name].key_line
                errs.add(key_line, sub,
                         f"duplicate {what} {name!r} on lines {first} and {key_line}")
                continue
            child = _tree(value_node, sub, errs, active)
            child.key_line = key_line
            entries[name] = child
        return _Node("map", entries, line)
    finally:
        active.discard(id(node))


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_STD_TAG):] if tag.startswith(_STD_TAG) else tag


def _from_python(value: Any, origin: str) -> _Node:
    """Wrap override values (e.g. from CLI flags) so they go through the same validation."""
    if isinstance(value, Mapping):
        return _Node("map", {str(k): _from_python(v, origin) for k, v in value.items()},
                     None, origin=origin)
    if isinstance(value, (list, tuple)):
        return _Node("seq", [_from_python(v, origin) for v in value], None, origin=origin)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _Node("scalar", value, None, raw=value if isinstance(value, str) else None,
                 origin=origin)


def _read_text(path: Path) -> tuple[bytes, int | None]:
    try:
        mtime = path.stat().st_mtime_ns
        return path.read_bytes(), mtime
    except OSError as exc:
        raise ConfigError(str(path), None, None, f"cannot read file: {exc.strerror}") from None


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(path, line, None, "file is not valid UTF-8") from None


def _parse_tree(text: str, errs: _Errors) -> _Node | None:
    node = _compose(text, errs)
    errs.check()
    return None if node is None else _tree(node, "", errs, set())


# --------------------------------------------------------------------------------------------
# Field converters: (node, field, errs) -> value, or _BAD after recording an error

Converter = Callable[[_Node, str, _Errors], Any]


def _expect_scalar(node: _Node, field: str, errs: _Errors, what: str) -> bool:
    if node.kind != "scalar":
        kind = "list" if node.kind == "seq" else "mapping"
        errs.add(node, field, f"must be {what}, not a {kind}")
        return False
    return True


def _string(*, nullable: bool = False, check: Callable[[str], None] | None = None) -> Converter:
    def convert(node: _Node, field: str, errs: _Errors) -> Any:
        if not _expect_scalar(node, field, errs, "a string"):
            return _BAD
        if node.value is None:
            if nullable:
                return None
            errs.add(node, field, "must not be empty")
            return _BAD
        text = node.value if isinstance(node.value, str) else node.raw
        if text is None:
            errs.add(node, field, f"must be a string, not {node.value!r}")
            return _BAD
        if check is not None:
            try:
                check(text)
            except ValueError as exc:
                errs.add(node, field, str(exc))
                return _BAD
        return text

    return convert


def _choice(choices: Sequence[str]) -> Converter:
    def check(text: str) -> None:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of: {', '.join(choices)}")

    return _string(check=check)


def _parsed(parse: Callable[[Any], Any], *, what: str, nullable: bool = False) -> Converter:
    def convert(node: _Node, field: str, errs: _Errors) -> Any:
        if not _expect_scalar(node, field, errs, what):
            return _BAD
        if node.value is None:
            if nullable:
                return None
            errs.add(node, field, f"must not be empty; give {what}")
            return _BAD
        try:
            return parse(node.value)
        except ValueError as exc:
            errs.add(node, field, str(exc))
            return _BAD

    return convert


def _boolean(node: _Node, field: str, errs: _Errors) -> Any:
    if node.kind == "scalar" and isinstance(node.value, bool):
        return node.value
    errs.add(node, field, f"must be true or false, not {node.raw if node.raw else node.value!r}")
    return _BAD


def _int_value(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, not {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _unlimited(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Allow the word ``unlimited`` so one user can lift a limit set in ``defaults``."""

    def wrapped(value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "unlimited":
            return None
        return parse(value)

    return wrapped


def _cpus_value(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number of CPUs (e.g. 2 or 0.5)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number of CPUs (e.g. 2 or 0.5), not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, not {value}")
    if value <= 0:
        raise ValueError(f"must be greater than zero, not {value}")
    return float(value)


MIN_MEMORY = 6 * 2**20  # Docker refuses smaller memory limits


def _memory_value(value: Any) -> int:
    size = parse_size(value)
    if size < MIN_MEMORY:
        raise ValueError(f"{value!r} is too small; Docker needs at least 6m ({MIN_MEMORY} bytes)")
    return size


MIN_DISK = 300 * 2**20  # mkfs.xfs refuses smaller filesystems


def _disk_value(value: Any) -> int:
    size = parse_size(value)
    if size < MIN_DISK:
        raise ValueError(f"{value!r} is too small; a disk quota must be at least 300m")
    return size


def _non_blank(text: str) -> None:
    if not text.strip():
        raise ValueError("must not be blank")


def _absolute_path(text: str) -> None:
    if not text.startswith("/") or any(c in text for c in "\0\n\r"):
        raise ValueError(f"must be an absolute path like /bin/bash, not {text!r}")


def _read_mapping(
    node: _Node, prefix: str, spec: Mapping[str, Converter], errs: _Errors,
    forbidden: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Convert a mapping's known fields; unknown ones are errors that list the allowed names."""
    if node.kind != "map":
        if prefix:
            errs.add(node, prefix, "must be a mapping of field: value")
        return None
    out: dict[str, Any] = {}
    for name, child in node.value.items():
        field_name = _dotted(prefix, name)
        if child.invalid:
            continue
        if forbidden and name in forbidden:
            errs.add(child.key_line if child.key_line else child, field_name, forbidden[name])
            continue
        convert = spec.get(name)
        if convert is None:
            close = difflib.get_close_matches(name, list(spec), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errs.add(child.key_line if child.key_line else child, field_name,
                     f"unknown field {name!r}{hint}; allowed: {', '.join(sorted(spec))}")
            continue
        value = convert(child, field_name, errs)
        if value is not _BAD:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------
# users.yaml


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

    @property
    def has_password_auth(self) -> bool:
        """Whether a password hash is configured (password login possible)."""
        return self.password is not None

    @property
    def can_log_in(self) -> bool:
        """False for disabled users and users with neither keys nor a password."""
        return not self.disabled and (bool(self.keys) or self.has_password_auth)

    def effective_idle_timeout(self, gateway: GatewayConfig) -> float | None:
        """Idle timeout in seconds for this user (None = never)."""
        if self.idle_timeout is INHERIT:
            return gateway.idle_timeout
        return self.idle_timeout

    def effective_max_sessions(self, gateway: GatewayConfig) -> int:
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


_USER_SPEC: dict[str, Converter] = {
    **_LIMIT_SPEC,
    "keys": _keys,
    "password": _string(nullable=True, check=check_password_hash),
}
_DEFAULTS_FORBIDDEN = {
    name: f"{name} is per-user and cannot be set in defaults"
    for name in ("keys", "password")
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


# --------------------------------------------------------------------------------------------
# gateway.yaml

SecurityProfile = Literal["rootless", "hardened", "privileged", "sysbox"]
SECURITY_PROFILES: tuple[str, ...] = ("rootless", "hardened", "privileged", "sysbox")
# docker: one DinD container per user; fake: local processes, for fast tests and demos only
BACKENDS: tuple[str, ...] = ("docker", "fake")
IDLE_POLICIES: tuple[str, ...] = ("activity", "strict")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")
PREFIX_RE = re.compile(r"[a-z][a-z0-9-]{0,20}")
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


def _check_docker_host(text: str) -> None:
    if not text.startswith("unix://"):
        raise ValueError(f"only unix:// sockets are supported, not {text!r}; the gateway talks "
                         "to a local Docker socket, e.g. unix:///var/run/docker.sock")
    if not text[len("unix://"):].startswith("/"):
        raise ValueError(f"{text!r} must name an absolute socket path, e.g. "
                         "unix:///var/run/docker.sock")


def _check_prefix(text: str) -> None:
    if not PREFIX_RE.fullmatch(text):
        raise ValueError(f"{text!r} must match ^[a-z][a-z0-9-]{{0,20}}$ (Docker objects are "
                         "named <prefix>-<user>)")


def _check_image(text: str) -> None:
    if not text.strip() or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} is not a Docker image reference")


@dataclass(frozen=True)
class ForwardRule:
    """An admin-allowed ``ssh -L`` destination: host (name, wildcard, IP or CIDR) and port."""

    host: str
    port: int | None  # None: any port

    def matches(self, host: str, port: int) -> bool:
        """Whether a requested destination is covered by this rule."""
        if self.port is not None and port != self.port:
            return False
        if "/" in self.host:
            try:
                return ipaddress.ip_address(host) in ipaddress.ip_network(self.host)
            except ValueError:
                return False
        try:
            return ipaddress.ip_address(host) == ipaddress.ip_address(self.host)
        except ValueError:
            return fnmatch.fnmatchcase(host.lower(), self.host.lower())

    def __str__(self) -> str:
        port = "*" if self.port is None else str(self.port)
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"


def _forward_rule(value: Any) -> ForwardRule:
    if not isinstance(value, str):
        raise ValueError(f"must be a 'host:port' pattern, not {value!r}")
    host, port = _split_host_port(value.strip(), "db.internal:5432 or 10.0.0.0/8:*")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r} needs a host pattern before the port")
    if "/" in host:
        try:
            ipaddress.ip_network(host)
        except ValueError as exc:
            raise ValueError(f"{host!r} is not a valid CIDR block: {exc}") from None
    return ForwardRule(host, None if port == "*" else parse_port(port, allow_zero=False))


def _forward_rules(node: _Node, field: str, errs: _Errors) -> Any:
    if _is_null(node):
        return ()
    if node.kind != "seq":
        errs.add(node, field, "must be a list of 'host:port' patterns")
        return _BAD
    rules = []
    for i, item in enumerate(node.value):
        if item.invalid:
            continue
        rule = _parsed(_forward_rule, what="a 'host:port' pattern")(item, f"{field}[{i}]", errs)
        if rule is not _BAD:
            rules.append(rule)
    return tuple(rules)


USER_SUBNET_PREFIX = 28  # one /28 per user network: 14 addresses, only two are used


def _network_pool(value: Any) -> ipaddress.IPv4Network:
    if not isinstance(value, str):
        raise ValueError("must be an IPv4 network like 10.213.0.0/16")
    try:
        net = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 network like 10.213.0.0/16 ({exc})") from None
    if net.prefixlen > USER_SUBNET_PREFIX:
        raise ValueError(f"{value} is too small: each user gets a /{USER_SUBNET_PREFIX}")
    return net


DEFAULT_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# Stricter than asyncssh's defaults, and at least as strict as OpenSSH 9.x's sshd: no SHA-1,
# no NIST curves, no group exchange (asyncssh can hand out a 1024-bit modulus).  Every
# OpenSSH >= 7.4 and PuTTY >= 0.76 finds curve25519-sha256, ssh-ed25519/rsa-sha2-* and
# hmac-sha2-*-etm here; `ssh-audit` reports no failure for these lists.
DEFAULT_KEX_ALGS = ("mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org",
                    "curve448-sha512", "diffie-hellman-group18-sha512",
                    "diffie-hellman-group16-sha512", "diffie-hellman-group14-sha256")
DEFAULT_HOST_KEY_ALGS = ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256")
DEFAULT_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
                "umac-128-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512",
                "umac-128@openssh.com")
_WEAK_CIPHERS = {"3des-cbc", "blowfish-cbc", "cast128-cbc", "seed-cbc@ssh.com", "arcfour256",
                 "arcfour128", "arcfour"}
# Broken or trivially weak: refused even when named explicitly (SHA-1 host-key signatures and
# the 1024-bit groups; MD5 and truncated-to-96-bit MACs).
_WEAK_KEX = {"diffie-hellman-group1-sha1", "rsa1024-sha1", "gss-group1-sha1",
             "diffie-hellman-group-exchange-sha1", "gss-gex-sha1"}
_WEAK_HOST_KEY_ALGS = {"ssh-rsa", "ssh-dss"}
_WEAK_MACS = {"hmac-md5", "hmac-md5-etm@openssh.com", "hmac-md5-96",
              "hmac-md5-96-etm@openssh.com"}


def _known_algs(kind: str) -> list[str]:
    """What the installed asyncssh implements for one algorithm list, minus the weak ones."""
    from asyncssh.encryption import get_encryption_algs
    from asyncssh.kex import get_kex_algs
    from asyncssh.mac import get_mac_algs
    from asyncssh.public_key import get_public_key_algs

    source, weak = {
        "cipher": (get_encryption_algs, _WEAK_CIPHERS),
        "key exchange algorithm": (get_kex_algs, _WEAK_KEX),
        "host key algorithm": (get_public_key_algs, _WEAK_HOST_KEY_ALGS),
        "MAC": (get_mac_algs, _WEAK_MACS),
    }[kind]
    return [a.decode() for a in source() if a.decode() not in weak
            and not a.decode().startswith("gss-")]


def _alg_list(kind: str, defaults: Sequence[str]) -> Converter:
    """A non-empty list of algorithm names that asyncssh supports, in order of preference."""

    def convert(node: _Node, field: str, errs: _Errors) -> Any:
        known = _known_algs(kind)
        if node.kind != "seq" or not node.value:
            errs.add(node, field, f"must be a non-empty list of {kind} names, e.g. "
                     f"[{', '.join(defaults)}]")
            return _BAD
        out: list[str] = []
        for i, item in enumerate(node.value):
            if item.invalid:
                return _BAD
            if item.kind != "scalar" or not isinstance(item.value, str) \
                    or item.value not in known:
                value = item.value if item.kind == "scalar" else f"a {item.kind}"
                errs.add(item, f"{field}[{i}]", f"unknown or weak {kind} {value!r}; "
                         f"choose from {', '.join(known)}")
                return _BAD
            if item.value in out:
                errs.add(item, f"{field}[{i}]", f"{item.value!r} is listed twice")
                return _BAD
            out.append(item.value)
        return tuple(out)

    return convert


_GATEWAY_SPEC: dict[str, Converter] = {
    "listen": _parsed(parse_address, what="host:port"),
    "users_file": _string(check=_non_blank),
    "state_dir": _string(check=_non_blank),
    "backend": _choice(BACKENDS),
    "image": _string(check=_check_image),
    "security_profile": _choice(SECURITY_PROFILES),
    "prefix": _string(check=_check_prefix),
    "docker_host": _string(nullable=True, check=_check_docker_host),
    "ready_timeout": _parsed(lambda v: parse_duration(v, allow_never=False), what="a duration"),
    "idle_timeout": _parsed(parse_duration, what="a duration or 'never'"),
    "idle_policy": _choice(IDLE_POLICIES),
    "max_sessions": _parsed(_int_value(1), what="a whole number"),
    "max_auth_tries": _parsed(_int_value(1), what="a whole number"),
    "login_grace_time": _parsed(lambda v: parse_duration(v, allow_never=False),
                                what="a duration"),
    "max_startups": _parsed(_int_value(1), what="a whole number"),
    "max_startups_per_source": _parsed(_int_value(1), what="a whole number"),
    "ban_threshold": _parsed(_int_value(1), what="a whole number"),
    "ban_seconds": _parsed(lambda v: parse_duration(v, allow_never=False), what="a duration"),
    "ban_max_seconds": _parsed(lambda v: parse_duration(v, allow_never=False),
                               what="a duration"),
    "allow_forward_to": _forward_rules,
    "user_network_pool": _parsed(_network_pool, what="an IPv4 network"),
    "ciphers": _alg_list("cipher", DEFAULT_CIPHERS),
    "kex_algorithms": _alg_list("key exchange algorithm", DEFAULT_KEX_ALGS),
    "host_key_algorithms": _alg_list("host key algorithm", DEFAULT_HOST_KEY_ALGS),
    "macs": _alg_list("MAC", DEFAULT_MACS),
    "audit_log": _string(nullable=True, check=_non_blank),
    "audit_stdout": _boolean,
    "audit_max_size": _parsed(parse_size, what="a size"),
    "audit_backups": _parsed(_int_value(0), what="a whole number"),
    "metrics_listen": _parsed(parse_address, what="host:port", nullable=True),
    "banner": _string(nullable=True),
    "help_contact": _string(nullable=True, check=_non_blank),
    "log_level": _choice(LOG_LEVELS),
}
_PATH_FIELDS = ("users_file", "state_dir")


@dataclass(frozen=True)
class GatewayConfig:
    """Gateway-wide settings from gateway.yaml; paths are absolute once loaded."""

    path: Path | None
    listen: Address
    users_file: Path
    state_dir: Path
    backend: Literal["docker", "fake"]
    image: str
    security_profile: SecurityProfile
    prefix: str
    docker_host: str | None  # None: $DOCKER_HOST, else DEFAULT_DOCKER_HOST (see docker_url)
    ready_timeout: float
    idle_timeout: float | None  # None: never
    idle_policy: Literal["activity", "strict"]
    max_sessions: int
    max_auth_tries: int
    login_grace_time: float
    max_startups: int
    max_startups_per_source: int
    ban_threshold: int  # failed logins from one address before it is banned
    ban_seconds: float  # first ban; it doubles on each repeat ...
    ban_max_seconds: float  # ... up to this
    allow_forward_to: tuple[ForwardRule, ...]
    user_network_pool: ipaddress.IPv4Network  # carved into one /28 per user network
    ciphers: tuple[str, ...]  # SSH encryption algorithms offered
    kex_algorithms: tuple[str, ...]  # key exchange algorithms offered
    host_key_algorithms: tuple[str, ...]  # host-key signature algorithms offered
    macs: tuple[str, ...]  # MAC algorithms offered (unused with AES-GCM)
    audit_log: Path | None  # None: no audit file
    audit_stdout: bool
    audit_max_size: int  # bytes per audit file before it is rotated
    audit_backups: int  # rotated files kept (audit.log.1 ...)
    metrics_listen: Address | None  # None: no metrics endpoint
    banner: str | None
    help_contact: str | None  # shown in the login line of interactive shells
    log_level: str

    @classmethod
    def default(cls, base_dir: Path | None = None, **overrides: Any) -> GatewayConfig:
        """Built-in defaults (for tests and file-less runs), relative paths under base_dir."""
        return parse_gateway_config("", None, overrides, base_dir=base_dir)

    @property
    def listen_host(self) -> str:
        """Host part of ``listen`` (no brackets), as asyncssh.listen() wants it."""
        return self.listen.host

    @property
    def listen_port(self) -> int:
        """Port part of ``listen``; 0 lets the OS pick one (tests)."""
        return self.listen.port

    def docker_url(self, environ: Mapping[str, str] | None = None) -> str:
        """The Docker socket URL: docker_host, else $DOCKER_HOST, else the standard socket."""
        if self.docker_host is not None:
            return self.docker_host
        env = os.environ if environ is None else environ
        value = env.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        try:
            _check_docker_host(value)
        except ValueError as exc:
            raise ConfigError("$DOCKER_HOST", None, "docker_host", str(exc)) from None
        return value

    def forward_allowed(self, host: str, port: int) -> bool:
        """Whether allow_forward_to admits an ``ssh -L`` target outside the user's container."""
        return any(rule.matches(host, port) for rule in self.allow_forward_to)


_GATEWAY_DEFAULTS: dict[str, Any] = {
    "listen": "0.0.0.0:2222",
    "users_file": "users.yaml",
    "state_dir": "/var/lib/dind-gateway",
    "backend": "docker",
    "image": "dind-gateway/dind:latest",
    "security_profile": "rootless",
    "prefix": "dgw",
    "docker_host": None,
    "ready_timeout": 60,
    "idle_timeout": "never",
    "idle_policy": "activity",
    "max_sessions": 10,
    "max_auth_tries": 6,
    "login_grace_time": 120,
    "max_startups": 100,
    "max_startups_per_source": 10,
    "ban_threshold": 10,
    "ban_seconds": "5m",
    "ban_max_seconds": "1d",
    "allow_forward_to": [],
    "user_network_pool": "10.213.0.0/16",
    "ciphers": list(DEFAULT_CIPHERS),
    "kex_algorithms": list(DEFAULT_KEX_ALGS),
    "host_key_algorithms": list(DEFAULT_HOST_KEY_ALGS),
    "macs": list(DEFAULT_MACS),
    "audit_log": "audit.log",
    "audit_stdout": False,
    "audit_max_size": "50m",
    "audit_backups": 5,
    "metrics_listen": None,
    "banner": None,
    "help_contact": None,
    "log_level": "info",
}


def _absolute(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / Path(value).expanduser()))


def parse_gateway_config(
    text: str, path: Path | str | None = None, overrides: Mapping[str, Any] | None = None,
    *, base_dir: Path | None = None, overrides_base_dir: Path | None = None,
) -> GatewayConfig:
    """Validate gateway.yaml text plus overrides (None values are ignored) into a config.

    Relative paths in the file resolve against base_dir (default: the file's directory, else
    the current one); relative paths in overrides resolve against overrides_base_dir (default:
    base_dir when there is no file, else the current directory, as a CLI user would expect).
    """
    label = str(path) if path is not None else "<defaults>"
    errs = _Errors(label)
    if base_dir is None:
        base_dir = Path(os.path.abspath(path)).parent if path is not None else Path.cwd()
    if overrides_base_dir is None:
        overrides_base_dir = Path.cwd() if path is not None else base_dir
    tree = _parse_tree(text, errs)
    entries: dict[str, _Node] = {}
    if tree is not None and not _is_null(tree):
        if tree.kind != "map":
            errs.add(tree, None, "gateway config must be a mapping of setting: value")
        else:
            entries.update(tree.value)
    for name, value in (overrides or {}).items():
        if value is not None:
            entries[name] = _from_python(value, "<overrides>")
    merged = _Node("map", entries, None)
    values = _read_mapping(merged, "", _GATEWAY_SPEC, errs) or {}
    errs.check()

    def get(name: str) -> Any:
        if name in values:
            return values[name]
        return _GATEWAY_SPEC[name](_from_python(_GATEWAY_DEFAULTS[name], "<built-in>"), name,
                                   errs)

    resolved = {name: get(name) for name in _GATEWAY_SPEC}
    ban, ban_max = resolved["ban_seconds"], resolved["ban_max_seconds"]
    if ban_max < ban:
        if "ban_max_seconds" in entries:
            errs.add(entries["ban_max_seconds"], "ban_max_seconds",
                     f"must be at least ban_seconds ({ban:g} s), not {ban_max:g} s")
        else:
            errs.add(entries["ban_seconds"], "ban_seconds",
                     f"must not exceed ban_max_seconds ({ban_max:g} s), not {ban:g} s")
        errs.check()
    for name in _PATH_FIELDS:
        base = overrides_base_dir if entries.get(name) and entries[name].origin else base_dir
        resolved[name] = _absolute(base, resolved[name])
    if resolved["audit_log"] is not None:
        resolved["audit_log"] = _absolute(resolved["state_dir"], resolved["audit_log"])
    return GatewayConfig(path=Path(path) if path is not None else None, **resolved)


def load_gateway_config(path: Path, overrides: dict[str, Any] | None = None) -> GatewayConfig:
    """Read gateway.yaml and apply overrides (e.g. CLI flags; None values are ignored)."""
    data, _ = _read_text(path)
    return parse_gateway_config(_decode(data, str(path)), path, overrides)
