"""gateway.yaml: the gateway-wide settings, into one frozen `GatewayConfig`."""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..auth import parse_port
from ..krl import KRLError, TrustedCA, parse_key_lines, parse_revoked
from .convert import (
    Address,
    Converter,
    _boolean,
    _choice,
    _int_value,
    _non_blank,
    _parsed,
    _read_mapping,
    _split_host_port,
    _string,
    parse_address,
    parse_duration,
    parse_size,
)
from .tree import _BAD, ConfigError, _decode, _Errors, _from_python, _Node, _parse_tree, _read_text
from .users import _is_null

SecurityProfile = Literal["rootless", "hardened", "privileged", "sysbox"]
SECURITY_PROFILES: tuple[str, ...] = ("rootless", "hardened", "privileged", "sysbox")
# docker: one DinD container per user; kubernetes: one DinD pod per user on a cluster;
# fake: local processes, for fast tests and demos only
BACKENDS: tuple[str, ...] = ("docker", "kubernetes", "fake")
IDLE_POLICIES: tuple[str, ...] = ("activity", "strict")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "critical")
PREFIX_RE = re.compile(r"[a-z][a-z0-9-]{0,20}")
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# auto: runc next to the engine where the gateway can (root, same host), else the exec API
PROCESS_PATHS = ("auto", "direct", "engine")


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


def _positive_number(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value == float("inf"):
        raise ValueError(f"must be a number greater than zero, not {value!r}")
    return float(value)


def _source_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(value, str):
        raise ValueError(f"must be an address or network like 10.0.0.0/8, not {value!r}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an address or network like 10.0.0.0/8 or "
                         "2001:db8::/32") from None


def _networks(node: _Node, field: str, errs: _Errors) -> Any:
    if _is_null(node):
        return ()
    if node.kind != "seq":
        errs.add(node, field, "must be a list of addresses or networks like 10.0.0.0/8")
        return _BAD
    out = []
    for i, item in enumerate(node.value):
        if item.invalid:
            continue
        net = _parsed(_source_network, what="an address or network")(item, f"{field}[{i}]",
                                                                      errs)
        if net is not _BAD:
            out.append(net)
    return tuple(out)


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


def _ca_key_sources(node: _Node, field: str, errs: _Errors) -> Any:
    """trusted_user_ca_keys: one string or a list; each a CA public key line (or several, in
    a block scalar) or the path of a file of them.  Read later, against the base directory."""
    if _is_null(node):
        return ()
    items = [node] if node.kind == "scalar" else node.value if node.kind == "seq" else None
    if items is None:
        errs.add(node, field, "must be a CA public key, a file of CA keys, or a list of them")
        return _BAD
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if node.kind == "seq" else field
        if item.invalid:
            continue
        if item.kind != "scalar" or not isinstance(item.value, str) or not item.value.strip():
            errs.add(item, where, "must be a CA public key line or a file path")
            continue
        out.append((where, item))
    return tuple(out)


_KEY_LINE_PREFIXES = ("ssh-", "ecdsa-", "sk-", "rsa-", "x509v3-")


def _load_ca_keys(sources: Sequence[tuple[str, _Node]], base: Path, errs: _Errors,
                  ) -> tuple[TrustedCA, ...]:
    """Read the CA keys inline or from their files; errors name the line the bad key is on."""
    out: list[TrustedCA] = []
    for where, node in sources:
        text: str = node.value
        if "\n" in text.strip() or text.strip().startswith(_KEY_LINE_PREFIXES):
            label = node.origin or errs.path
            # a block scalar's text starts on the line after its `|` indicator
            first = (node.line or 1) - (0 if "\n" in text.strip() else 1)
        else:
            path = _absolute(base, text.strip())
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                errs.add(node, where, f"cannot read CA key file {path}: {why}")
                continue
            label, first = str(path), 0
        try:
            keys = parse_key_lines(text, allow_certs=False)
        except KRLError as exc:
            errs.items.append(ConfigError(label, first + (exc.line or 1), where,
                                          f"bad CA key: {exc}"))
            continue
        if not keys:
            errs.add(node, where, f"no CA public key in {label}")
        out += [TrustedCA(key, key.get_fingerprint(), f"{label}:{first + n}")
                for n, key in keys]
    return tuple(out)


def _check_revoked(path: Path, node: _Node, errs: _Errors) -> None:
    try:
        parse_revoked(path.read_bytes())
    except OSError as exc:
        errs.add(node, "revoked_keys", f"cannot read {path}: {exc.strerror}")
    except KRLError as exc:
        if exc.line is not None:
            errs.items.append(ConfigError(str(path), exc.line, "revoked_keys", str(exc)))
        else:
            errs.add(node, "revoked_keys", f"{path}: {exc}")


_REGISTRY_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?")


def _registry_url(value: Any) -> str:
    """registry_mirror: http(s)://host[:port], nothing after it (dind-init writes it into
    daemon.json, so only these characters ever reach it)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a URL like http://mirror.local:5000, not {value!r}")
    text = value.strip().rstrip("/")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not _REGISTRY_RE.fullmatch(rest):
        raise ValueError(f"{value!r} is not a URL like http://mirror.local:5000 or "
                         "https://mirror.example.com (scheme, host, optional port; no path)")
    return text


def _registry_host(value: Any) -> str:
    if not isinstance(value, str) or not _REGISTRY_RE.fullmatch(value.strip()):
        raise ValueError(f"{value!r} is not a registry host[:port] like registry.local:5000")
    return value.strip()


def _string_list(item: Callable[[Any], Any], what: str) -> Converter:
    def convert(node: _Node, field: str, errs: _Errors) -> Any:
        if _is_null(node):
            return ()
        if node.kind != "seq":
            errs.add(node, field, f"must be a list of {what}")
            return _BAD
        out = []
        for i, child in enumerate(node.value):
            if child.invalid:
                continue
            value = _parsed(item, what=what)(child, f"{field}[{i}]", errs)
            if value is not _BAD:
                out.append(value)
        return tuple(out)

    return convert


def _image_ref(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be an image reference, not {value!r}")
    _check_image(value)
    return value


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


@dataclass(frozen=True)
class KubernetesSettings:
    """`kubernetes:` in gateway.yaml, read only with `backend: kubernetes`."""

    kubeconfig: Path | None  # None: the pod's service account (in-cluster)
    context: str | None
    namespace: str
    storage_class: str | None  # None: the cluster's default class
    host_path: str | None  # pre-bound hostPath volumes under this node directory (dev)
    home_size: int
    docker_size: int
    image_pull_policy: str
    node_selector: tuple[tuple[str, str], ...]
    gateway_labels: tuple[tuple[str, str], ...]  # the only pods her NetworkPolicy admits


def _str_map(node: _Node, field: str, errs: _Errors) -> Any:
    if node.kind != "map":
        errs.add(node, field, "must be a mapping of name: value")
        return _BAD
    out = []
    for name, child in node.value.items():
        if child.kind != "scalar" or not isinstance(child.value, str | int | float | bool):
            errs.add(child, f"{field}.{name}", "must be a string")
            return _BAD
        out.append((str(name), str(child.value)))
    return tuple(out)


_KUBERNETES_SPEC: dict[str, Converter] = {
    "kubeconfig": _string(nullable=True, check=_non_blank),
    "context": _string(nullable=True, check=_non_blank),
    "namespace": _string(check=_check_prefix),
    "storage_class": _string(nullable=True, check=_non_blank),
    "host_path": _string(nullable=True, check=_non_blank),
    "home_size": _parsed(parse_size, what="a size"),
    "docker_size": _parsed(parse_size, what="a size"),
    "image_pull_policy": _choice(("IfNotPresent", "Never", "Always")),
    "node_selector": _str_map,
    "gateway_labels": _str_map,
}
_KUBERNETES_DEFAULTS: dict[str, Any] = {
    "kubeconfig": None, "context": None, "namespace": "dind-gateway", "storage_class": None,
    "host_path": None, "home_size": "10g", "docker_size": "20g",
    "image_pull_policy": "IfNotPresent", "node_selector": {},
    "gateway_labels": {"app.kubernetes.io/name": "dind-gateway"},
}


def _kubernetes(node: _Node, field: str, errs: _Errors) -> Any:
    values = _read_mapping(node, field, _KUBERNETES_SPEC, errs)
    if values is None:
        return _BAD
    for name, default in _KUBERNETES_DEFAULTS.items():
        if name not in values:
            values[name] = _KUBERNETES_SPEC[name](_from_python(default, "<built-in>"),
                                                  f"{field}.{name}", errs)
    return KubernetesSettings(**values)


_GATEWAY_SPEC: dict[str, Converter] = {
    "listen": _parsed(parse_address, what="host:port"),
    "users_file": _string(check=_non_blank),
    "state_dir": _string(check=_non_blank),
    "backend": _choice(BACKENDS),
    "image": _string(check=_check_image),
    "security_profile": _choice(SECURITY_PROFILES),
    "prefix": _string(check=_check_prefix),
    "docker_host": _string(nullable=True, check=_check_docker_host),
    "process_path": _choice(PROCESS_PATHS),
    "ready_timeout": _parsed(lambda v: parse_duration(v, allow_never=False), what="a duration"),
    "idle_timeout": _parsed(parse_duration, what="a duration or 'never'"),
    "idle_policy": _choice(IDLE_POLICIES),
    "max_sessions": _parsed(_int_value(1), what="a whole number"),
    "max_auth_tries": _parsed(_int_value(1), what="a whole number"),
    "login_grace_time": _parsed(lambda v: parse_duration(v, allow_never=False),
                                what="a duration"),
    "client_alive_interval": _parsed(parse_duration, what="a duration or 'never'"),
    "client_alive_count_max": _parsed(_int_value(1), what="a whole number"),
    "max_startups": _parsed(_int_value(1), what="a whole number"),
    "max_startups_per_source": _parsed(_int_value(1), what="a whole number"),
    "ident_timeout": _parsed(lambda v: parse_duration(v, allow_never=False), what="a duration"),
    "noauth_burst": _parsed(_int_value(1), what="a whole number"),
    "noauth_per_second": _parsed(_positive_number, what="a number"),
    "trusted_sources": _networks,
    "ban_threshold": _parsed(_int_value(1), what="a whole number"),
    "ban_seconds": _parsed(lambda v: parse_duration(v, allow_never=False), what="a duration"),
    "ban_max_seconds": _parsed(lambda v: parse_duration(v, allow_never=False),
                               what="a duration"),
    "allow_forward_to": _forward_rules,
    "allow_agent_forwarding": _boolean,
    "allow_remote_forwarding": _boolean,
    "user_network_pool": _parsed(_network_pool, what="an IPv4 network"),
    "host_firewall": _boolean,
    "registry_mirror": _parsed(_registry_url, what="a URL", nullable=True),
    "insecure_registries": _string_list(_registry_host, "registry host[:port] names"),
    "preload_images": _string_list(_image_ref, "image references"),
    "ciphers": _alg_list("cipher", DEFAULT_CIPHERS),
    "kex_algorithms": _alg_list("key exchange algorithm", DEFAULT_KEX_ALGS),
    "host_key_algorithms": _alg_list("host key algorithm", DEFAULT_HOST_KEY_ALGS),
    "macs": _alg_list("MAC", DEFAULT_MACS),
    "audit_log": _string(nullable=True, check=_non_blank),
    "audit_stdout": _boolean,
    "audit_max_size": _parsed(parse_size, what="a size"),
    "audit_backups": _parsed(_int_value(0), what="a whole number"),
    "recordings_dir": _string(check=_non_blank),
    "recording_max_size": _parsed(parse_size, what="a size"),
    "metrics_listen": _parsed(parse_address, what="host:port", nullable=True),
    "banner": _string(nullable=True),
    "trusted_user_ca_keys": _ca_key_sources,
    "revoked_keys": _string(nullable=True, check=_non_blank),
    "help_contact": _string(nullable=True, check=_non_blank),
    "log_level": _choice(LOG_LEVELS),
    "kubernetes": _kubernetes,
}
_PATH_FIELDS = ("users_file", "state_dir")


@dataclass(frozen=True)
class GatewayConfig:
    """Gateway-wide settings from gateway.yaml; paths are absolute once loaded."""

    path: Path | None
    listen: Address
    users_file: Path
    state_dir: Path
    backend: Literal["docker", "kubernetes", "fake"]
    image: str
    security_profile: SecurityProfile
    prefix: str
    docker_host: str | None  # None: $DOCKER_HOST, else DEFAULT_DOCKER_HOST (see docker_url)
    process_path: Literal["auto", "direct", "engine"]  # how sessions start (docker/direct.py)
    ready_timeout: float
    idle_timeout: float | None  # None: never
    idle_policy: Literal["activity", "strict"]
    max_sessions: int
    max_auth_tries: int
    login_grace_time: float
    client_alive_interval: float | None  # keepalive probe interval; None: never
    client_alive_count_max: int  # unanswered probes before the client is dropped
    max_startups: int
    max_startups_per_source: int
    ident_timeout: float  # seconds a client has to send its SSH version line
    noauth_burst: int  # connections a source may leave unauthenticated before it is throttled
    noauth_per_second: float  # ... and how fast that is forgiven
    trusted_sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # NAT, CI
    ban_threshold: int  # failed logins from one address before it is banned
    ban_seconds: float  # first ban; it doubles on each repeat ...
    ban_max_seconds: float  # ... up to this
    allow_forward_to: tuple[ForwardRule, ...]
    allow_agent_forwarding: bool  # ssh -A: the client's agent as a socket in her container
    allow_remote_forwarding: bool  # ssh -R: listeners on her container's loopback
    user_network_pool: ipaddress.IPv4Network  # carved into one /28 per user network
    host_firewall: bool  # drop new connections from that pool to the host (docker/firewall.py)
    # every inner daemon's registry-mirrors (a container's name as host: that container is
    # attached to each user network and reached at an address of hers) ...
    registry_mirror: str | None
    insecure_registries: tuple[str, ...]  # ... and insecure-registries
    preload_images: tuple[str, ...]  # host-engine images loaded into each new inner daemon
    ciphers: tuple[str, ...]  # SSH encryption algorithms offered
    kex_algorithms: tuple[str, ...]  # key exchange algorithms offered
    host_key_algorithms: tuple[str, ...]  # host-key signature algorithms offered
    macs: tuple[str, ...]  # MAC algorithms offered (unused with AES-GCM)
    audit_log: Path | None  # None: no audit file
    audit_stdout: bool
    audit_max_size: int  # bytes per audit file before it is rotated
    audit_backups: int  # rotated files kept (audit.log.1 ...)
    recordings_dir: Path  # asciicast files of users with `record: true`
    recording_max_size: int  # bytes per recording; output past it is not written
    metrics_listen: Address | None  # None: no metrics endpoint
    banner: str | None
    trusted_user_ca_keys: tuple[TrustedCA, ...]  # sshd's TrustedUserCAKeys
    revoked_keys: Path | None  # sshd's RevokedKeys: a KRL or a file of public keys
    help_contact: str | None  # shown in the login line of interactive shells
    log_level: str
    kubernetes: KubernetesSettings

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
    "process_path": "auto",
    "ready_timeout": 60,
    "idle_timeout": "never",
    "idle_policy": "activity",
    "max_sessions": 10,
    "max_auth_tries": 6,
    "login_grace_time": 120,
    "client_alive_interval": "30s",
    "client_alive_count_max": 3,
    "max_startups": 100,
    "max_startups_per_source": 10,
    "ident_timeout": 10,
    "noauth_burst": 20,
    "noauth_per_second": 2,
    "trusted_sources": [],
    "ban_threshold": 10,
    "ban_seconds": "5m",
    "ban_max_seconds": "1d",
    "allow_forward_to": [],
    "allow_agent_forwarding": True,
    "allow_remote_forwarding": True,
    "user_network_pool": "10.213.0.0/16",
    "host_firewall": True,
    "registry_mirror": None,
    "insecure_registries": [],
    "preload_images": [],
    "ciphers": list(DEFAULT_CIPHERS),
    "kex_algorithms": list(DEFAULT_KEX_ALGS),
    "host_key_algorithms": list(DEFAULT_HOST_KEY_ALGS),
    "macs": list(DEFAULT_MACS),
    "audit_log": "audit.log",
    "audit_stdout": False,
    "audit_max_size": "50m",
    "audit_backups": 5,
    "recordings_dir": "recordings",
    "recording_max_size": "100m",
    "metrics_listen": None,
    "banner": None,
    "trusted_user_ca_keys": None,
    "revoked_keys": None,
    "help_contact": None,
    "log_level": "info",
    "kubernetes": {},
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
    base_for: dict[str, Path] = {}
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
    kube = resolved["kubernetes"]
    if kube.kubeconfig is not None:
        resolved["kubernetes"] = dataclasses.replace(
            kube, kubeconfig=_absolute(base_dir, str(kube.kubeconfig)))
    if resolved["audit_log"] is not None:
        resolved["audit_log"] = _absolute(resolved["state_dir"], resolved["audit_log"])
    resolved["recordings_dir"] = _absolute(resolved["state_dir"], resolved["recordings_dir"])
    for name in ("trusted_user_ca_keys", "revoked_keys"):
        node = entries.get(name)
        base_for[name] = overrides_base_dir if node is not None and node.origin else base_dir
    resolved["trusted_user_ca_keys"] = _load_ca_keys(resolved["trusted_user_ca_keys"],
                                                     base_for["trusted_user_ca_keys"], errs)
    if resolved["revoked_keys"] is not None:
        revoked = _absolute(base_for["revoked_keys"], resolved["revoked_keys"])
        resolved["revoked_keys"] = revoked
        _check_revoked(revoked, entries["revoked_keys"], errs)
    errs.check()
    return GatewayConfig(path=Path(path) if path is not None else None, **resolved)


def load_gateway_config(path: Path, overrides: dict[str, Any] | None = None) -> GatewayConfig:
    """Read gateway.yaml and apply overrides (e.g. CLI flags; None values are ignored)."""
    data, _ = _read_text(path)
    return parse_gateway_config(_decode(data, str(path)), path, overrides)
