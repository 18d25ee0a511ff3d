"""users.yaml: defaults, groups, users, their keys and limits, into frozen objects.

A user's settings: her own value, else her groups' (``groups:`` entries listing her under
``members:``), else ``defaults:``, else built-in.  Two of her groups setting one field to
different values is an error unless she sets it herself (no silent "last group wins"); her
groups' shared volumes add up.
"""

from __future__ import annotations

import difflib
import enum
import functools
import hashlib
import posixpath
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
GROUP_NAME_RE = USER_NAME_RE  # also a Docker/disk name part: <prefix>.<group>.<volume>
VOLUME_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# An image reference as Docker takes it: [registry[:port]/]path[:tag][@digest], path lower-case.
_IMAGE_RE = re.compile(
    r"(?:[A-Za-z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?")
# Where a shared volume may not be mounted: the system's own trees and the user's volumes.
RESERVED_PATHS = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64",
                  "/libx32", "/proc", "/root", "/run", "/sbin", "/sys", "/tmp", "/usr",
                  "/var/lib/docker", "/var/run", "/var/tmp")


@dataclass(frozen=True)
class SharedVolume:
    """A volume of a group, mounted at `path` in every member's container (quota `size`)."""

    group: str
    name: str
    path: str
    size: int
    read_only: bool = False
    line: int | None = None


@dataclass(frozen=True)
class Group:
    """A ``groups:`` entry: its members (file order), the settings it gives them, its volumes.

    ``settings`` holds only the fields the group sets (cpus, memory, image, ...)."""

    name: str
    members: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    volumes: tuple[SharedVolume, ...] = ()
    line: int | None = None


@dataclass(frozen=True)
class ImageField:
    """Where an image reference is set (for the reload check against the engine)."""

    field: str
    line: int | None
    ref: str

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
    image: str | None = None
    record: bool = False


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
    image: str | None = None  # None: the gateway's `image`
    groups: tuple[str, ...] = ()  # in the order of the users file's groups: section
    volumes: tuple[SharedVolume, ...] = ()  # of her groups, mounted at their paths
    principals: tuple[str, ...] = ()  # certificate principals from trusted_user_ca_keys
    record: bool = False  # her pty sessions are written as asciicast files (she is told)

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
    groups: Mapping[str, Group] = field(default_factory=dict)
    images: tuple[ImageField, ...] = ()  # every `image:` of the file, where it is set

    def user(self, name: str) -> User | None:
        """Look a user up by login name."""
        return self.users.get(name)

    @functools.cached_property
    def has_passwords(self) -> bool:
        """Whether any user has a password hash (password auth is offered only then)."""
        return any(u.has_password_auth for u in self.users.values())


def _image_ref(text: str) -> None:
    if not _IMAGE_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not an image reference; use e.g. "
                         "dind-gateway/dind:latest or registry:5000/team/dind:1.2")


def _shared_path(text: str) -> None:
    if not text.startswith("/") or any(c in text for c in "\0\n\r:,") or text == "/":
        raise ValueError(f"must be an absolute path like /srv/data, not {text!r}")
    if posixpath.normpath(text) != text or text.startswith("//"):
        raise ValueError(f"{text!r} is not a normal path; write {posixpath.normpath(text)!r}")
    for reserved in RESERVED_PATHS:
        if text == reserved or text.startswith(reserved + "/"):
            raise ValueError(f"{text!r} is inside {reserved}, which the container needs for "
                             "itself; use e.g. /srv/NAME")


_LIMIT_SPEC: dict[str, Converter] = {
    "cpus": _parsed(_unlimited(_cpus_value), what="a number of CPUs or 'unlimited'"),
    "memory": _parsed(_unlimited(_memory_value), what="a size like 4g or 'unlimited'"),
    "pids": _parsed(_unlimited(_int_value(10)), what="a whole number or 'unlimited'"),
    "disk": _parsed(_unlimited(_disk_value), what="a size like 20g or 'unlimited'"),
    "disabled": _boolean,
    "idle_timeout": _parsed(parse_duration, what="a duration like 30m or 'never'"),
    "max_sessions": _parsed(_int_value(1), what="a whole number"),
    "shell": _string(check=_absolute_path),
    "image": _string(check=_image_ref),
    "record": _boolean,
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


def _members(node: _Node, field: str, errs: _Errors) -> Any:
    """A group's ``members:``: user names (each once); (name, node) pairs, for later checks."""
    if _is_null(node):
        return ()
    if node.kind != "seq":
        errs.add(node, field, "must be a list of user names, e.g. [alice, bob]")
        return _BAD
    out: list[tuple[str, _Node]] = []
    for i, item in enumerate(node.value):
        item_field = f"{field}[{i}]"
        if item.invalid:
            continue
        text = item.value if isinstance(item.value, str) else item.raw
        if item.kind != "scalar" or not text or not USER_NAME_RE.fullmatch(text):
            errs.add(item, item_field, "must be a user name")
            continue
        if any(text == seen for seen, _ in out):
            errs.add(item, item_field, f"{text!r} is listed twice")
            continue
        out.append((text, item))
    return tuple(out)


_VOLUME_SPEC: dict[str, Converter] = {
    "path": _string(check=_shared_path),
    "size": _parsed(_disk_value, what="a size like 50g"),
    "read_only": _boolean,
}
_GROUP_SPEC: dict[str, Converter] = {**_LIMIT_SPEC, "members": _members,
                                     "volumes": lambda node, _field, _errs: node}
_GROUP_FORBIDDEN = {
    name: f"{name} is per-user: list the user under members and set {name} in users:"
    for name in ("keys", "password")
}


def _volumes(group: str, node: _Node | None, field: str, errs: _Errors,
             ) -> tuple[SharedVolume, ...]:
    if node is None or _is_null(node):
        return ()
    if node.kind != "map":
        errs.add(node, field, "must be a mapping of volume name to path:, size:, read_only:")
        return ()
    out: list[SharedVolume] = []
    for name, vnode in node.value.items():
        vfield = f"{field}.{name}"
        if not VOLUME_NAME_RE.fullmatch(name):
            errs.add(vnode.key_line, vfield,
                     f"invalid volume name {name!r}: use 1-32 characters, lower-case letters, "
                     "digits, '_' and '-', starting with a letter or digit")
            continue
        values = _read_mapping(vnode, vfield, _VOLUME_SPEC, errs)
        if values is None:
            continue
        missing = [k for k in ("path", "size") if k not in vnode.value]
        if missing:
            errs.add(vnode.key_line, vfield,
                     f"needs {' and '.join(k + ':' for k in missing)} (e.g. path: /srv/{name}, "
                     "size: 50g)")
        if "path" not in values or "size" not in values:
            continue
        clash = next((v for v in out if v.path == values["path"]), None)
        if clash is not None:
            errs.add(vnode.value["path"], f"{vfield}.path",
                     f"{values['path']} is also the path of {field}.{clash.name} "
                     f"(line {clash.line})")
            continue
        out.append(SharedVolume(group=group, name=name, path=values["path"],
                                size=values["size"], read_only=values.get("read_only", False),
                                line=vnode.key_line))
    return tuple(out)


def _parse_groups(g_node: _Node, errs: _Errors,
                  ) -> tuple[dict[str, Group], dict[str, _Node], dict[str, tuple]]:
    """Groups with their own settings; also their nodes and (name, node) member pairs."""
    groups: dict[str, Group] = {}
    nodes: dict[str, _Node] = {}
    members: dict[str, tuple] = {}
    if g_node.kind != "map":
        errs.add(g_node, "groups", "must be a mapping of group name to members:, image:, ...")
        return groups, nodes, members
    for name, node in g_node.value.items():
        field_name = f"groups.{name}"
        if not GROUP_NAME_RE.fullmatch(name):
            errs.add(node.key_line, field_name,
                     f"invalid group name {name!r}: use 1-32 characters, lower-case letters, "
                     "digits, '_' and '-', starting with a letter or '_'")
            continue
        if _is_null(node):
            values: dict[str, Any] | None = {}
        elif node.kind != "map":
            errs.add(node, field_name, "must be a mapping (members:, image:, volumes:, ...)")
            continue
        else:
            values = _read_mapping(node, field_name, _GROUP_SPEC, errs, _GROUP_FORBIDDEN)
        if values is None:
            continue
        volumes = _volumes(name, values.pop("volumes", None), f"{field_name}.volumes", errs)
        pairs = values.pop("members", ())
        groups[name] = Group(name=name, members=tuple(m for m, _ in pairs),
                             settings=MappingProxyType(values), volumes=volumes,
                             line=node.key_line)
        nodes[name] = node
        members[name] = pairs
    return groups, nodes, members


def _merge_groups(user: str, own: Mapping[str, Any], mine: list[Group],
                  nodes: Mapping[str, _Node], errs: _Errors,
                  ) -> tuple[dict[str, Any], tuple[SharedVolume, ...]]:
    """What her groups give her: a field set by two of them with different values is an error
    unless she sets it herself; volumes add up, two at one path are an error."""
    merged: dict[str, Any] = {}
    origin: dict[str, Group] = {}
    for group in mine:
        for key, value in group.settings.items():
            if key not in merged:
                merged[key], origin[key] = value, group
            elif merged[key] != value and key not in own:
                first = origin[key]
                line = nodes[first.name].value[key].where
                errs.add(nodes[group.name].value[key], f"groups.{group.name}.{key}",
                         f"differs from groups.{first.name}.{key} (line {line}) for their "
                         f"member {user}; set users.{user}.{key} to choose, or make them agree")
    volumes: list[SharedVolume] = []
    for group in mine:
        for vol in group.volumes:
            clash = next((v for v in volumes if v.path == vol.path), None)
            if clash is not None:
                errs.add(vol.line, f"groups.{group.name}.volumes.{vol.name}",
                         f"{vol.path} is also where groups.{clash.group}.volumes.{clash.name} "
                         f"(line {clash.line}) is mounted for their member {user}")
                continue
            volumes.append(vol)
    return merged, tuple(volumes)


def _build_user(name: str, settings: Mapping[str, Any], defaults: UserDefaults,
                line: int | None, groups: Mapping[str, Any] | None = None,
                member_of: tuple[str, ...] = (),
                volumes: tuple[SharedVolume, ...] = ()) -> User:
    """Her own value, else her groups', else ``defaults:``, else built-in."""
    from_groups = groups or {}

    def pick(key: str) -> Any:
        if key in settings:
            return settings[key]
        return from_groups[key] if key in from_groups else getattr(defaults, key)

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
        image=pick("image"),
        groups=member_of,
        volumes=volumes,
        principals=settings.get("principals", ()),
        record=pick("record"),
    )


def parse_users(text: str, path: Path | None = None, *, mtime_ns: int | None = None,
                ) -> UsersConfig:
    """Validate users.yaml text into a new UsersConfig, or raise ConfigError(s)."""
    errs = _Errors(str(path) if path is not None else "<users>")
    tree = _parse_tree(text, errs)
    defaults = UserDefaults()
    users: dict[str, User] = {}
    groups: dict[str, Group] = {}
    images: list[ImageField] = []
    if tree is not None and not (tree.kind == "scalar" and tree.value is None):
        if tree.kind != "map":
            errs.add(tree, None, "users file must be a mapping with defaults: and users:")
        top = _read_mapping(tree, "", {"defaults": _keep, "groups": _keep, "users": _keep},
                            errs) or {}
        d_node = top.get("defaults")
        if d_node is not None and not _is_null(d_node):
            values = _read_mapping(d_node, "defaults", _LIMIT_SPEC, errs, _DEFAULTS_FORBIDDEN)
            defaults = UserDefaults(**(values or {}))
            if defaults.image is not None:
                images.append(ImageField("defaults.image", d_node.value["image"].where,
                                         defaults.image))
        g_node = top.get("groups")
        group_nodes: dict[str, _Node] = {}
        member_nodes: dict[str, tuple] = {}
        if g_node is not None and not _is_null(g_node):
            groups, group_nodes, member_nodes = _parse_groups(g_node, errs)
            images += [ImageField(f"groups.{g.name}.image",
                                  group_nodes[g.name].value["image"].where, g.settings["image"])
                       for g in groups.values() if "image" in g.settings]
        raw: dict[str, tuple[dict[str, Any], _Node]] = {}
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
                        raw[name] = (settings, node)
                        if "image" in settings:
                            images.append(ImageField(f"{field_name}.image",
                                                     node.value["image"].where,
                                                     settings["image"]))
        known = set(raw) | ({n for n in u_node.value} if u_node is not None
                            and u_node.kind == "map" else set())
        for gname, pairs in member_nodes.items():
            for i, (member, item) in enumerate(pairs):
                if member not in known:
                    close = difflib.get_close_matches(member, sorted(known), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    errs.add(item, f"groups.{gname}.members[{i}]",
                             f"no user {member!r} in users:{hint}")
        for name, (settings, node) in raw.items():
            mine = [g for g in groups.values() if name in g.members]
            merged, volumes = _merge_groups(name, settings, mine, group_nodes, errs)
            users[name] = _build_user(name, settings, defaults, node.key_line, merged,
                                      tuple(g.name for g in mine), volumes)
    errs.check()
    digest = hashlib.sha256(text.encode()).hexdigest()
    return UsersConfig(
        path=path,
        users=MappingProxyType(users),
        defaults=defaults,
        digest=digest,
        mtime_ns=mtime_ns,
        groups=MappingProxyType(groups),
        images=tuple(images),
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


