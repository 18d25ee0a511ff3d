"""Unit tests for gateway.config: every bad file must be reported as file:line: field."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncssh
import pytest
from passlib.hash import bcrypt, sha256_crypt, sha512_crypt

from gateway.config import (
    INHERIT,
    Address,
    AuthorizedKey,
    ConfigError,
    ConfigErrors,
    GatewayConfig,
    load_gateway_config,
    load_users,
    parse_address,
    parse_authorized_key,
    parse_duration,
    parse_size,
    parse_users,
)

from ..cases import _PRIVATE, BAD_USERS, KEY

REPO = Path(__file__).resolve().parents[2]
KEY2 = (
    asyncssh.generate_private_key("ssh-ed25519", comment="other")
    .export_public_key("openssh").decode().strip()
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_key(line: str) -> AuthorizedKey:
    return parse_authorized_key(line, 1)


# --------------------------------------------------------------------------------------------
# Example config


def test_example_config_loads() -> None:
    gw = load_gateway_config(REPO / "config" / "gateway.yaml")
    assert gw.listen == Address("0.0.0.0", 2222)
    assert gw.users_file == REPO / "config" / "users.yaml"
    assert gw.state_dir == REPO / "state"
    assert gw.audit_log == REPO / "state" / "audit.log"
    assert gw.image == "dind-gateway/dind:latest"
    assert gw.security_profile == "rootless"
    assert gw.idle_timeout is None

    users = load_users(gw.users_file)
    alice = users.user("alice")
    assert alice is not None
    assert list(users.users) == ["alice"]
    assert len(alice.keys) == 1
    assert alice.keys[0].key.get_algorithm() == "ssh-ed25519"
    assert alice.keys[0].fingerprint.startswith("SHA256:")
    assert (alice.cpus, alice.memory, alice.pids) == (2.0, 4 * 2**30, 2000)
    assert alice.can_log_in
    assert users.user("bob") is None


def test_gateway_defaults() -> None:
    gw = GatewayConfig.default(base_dir=Path("/etc/dgw"))
    assert gw.listen == Address("0.0.0.0", 2222)
    assert gw.users_file == Path("/etc/dgw/users.yaml")
    assert gw.state_dir == Path("/var/lib/dind-gateway")
    assert gw.audit_log == Path("/var/lib/dind-gateway/audit.log")
    assert (gw.security_profile, gw.prefix, gw.docker_host) == ("rootless", "dgw", None)
    assert (gw.ready_timeout, gw.idle_timeout, gw.idle_policy) == (60, None, "activity")
    assert (gw.max_sessions, gw.max_auth_tries, gw.login_grace_time, gw.max_startups) == (
        10, 6, 120, 100)
    assert gw.allow_forward_to == ()
    assert (gw.audit_stdout, gw.metrics_listen, gw.banner, gw.log_level) == (
        False, None, None, "info")
    assert (gw.max_startups_per_source, gw.ban_threshold, gw.ban_seconds,
            gw.ban_max_seconds) == (10, 10, 300, 86400)
    assert (gw.audit_max_size, gw.audit_backups, gw.help_contact) == (50 * 2**20, 5, None)


BAD_GATEWAY = [
    ("listen-bad-port", "listen: 0.0.0.0:99999\n", 1, "listen", "out of range"),
    ("listen-no-port", "image: x\nlisten: 0.0.0.0\n", 2, "listen", "has no port"),
    ("listen-ipv6-no-brackets", "listen: '::1:2222'\n", 1, "listen", "brackets"),
    ("listen-port-text", "listen: localhost:ssh\n", 1, "listen", "not a number"),
    ("security-profile", "image: x\n\nsecurity_profile: paranoid\n", 3, "security_profile",
     "hardened, privileged, sysbox"),
    ("prefix-upper", "prefix: DGW\n", 1, "prefix", "<prefix>-<user>"),
    ("prefix-too-long", f"prefix: {'a' * 22}\n", 1, "prefix", "^[a-z][a-z0-9-]{0,20}$"),
    ("docker-host-tcp", "docker_host: tcp://10.0.0.1:2375\n", 1, "docker_host",
     "only unix:// sockets are supported"),
    ("docker-host-relative", "docker_host: unix://docker.sock\n", 1, "docker_host", "absolute"),
    ("ready-timeout-negative", "ready_timeout: -5\n", 1, "ready_timeout", "greater than zero"),
    ("ready-timeout-never", "ready_timeout: never\n", 1, "ready_timeout", "not allowed"),
    ("idle-timeout-parsecs", "idle_timeout: 5 parsecs\n", 1, "idle_timeout", "not a duration"),
    ("idle-policy", "idle_policy: lazy\n", 1, "idle_policy", "activity, strict"),
    ("max-sessions-zero", "max_sessions: 0\n", 1, "max_sessions", "at least 1"),
    ("max-auth-tries-text", "max_auth_tries: lots\n", 1, "max_auth_tries", "whole number"),
    ("login-grace-zero", "login_grace_time: 0\n", 1, "login_grace_time", "greater than zero"),
    ("max-startups-float", "max_startups: 2.5\n", 1, "max_startups", "whole number"),
    ("unknown-field", "listne: 0.0.0.0:2222\n", 1, "listne", "did you mean 'listen'"),
    ("duplicate-field", "listen: 0.0.0.0:2222\nimage: x\nlisten: 0.0.0.0:22\n", 3, "listen",
     "lines 1 and 3"),
    ("audit-stdout-text", "audit_stdout: yes please\n", 1, "audit_stdout", "true or false"),
    ("forward-not-list", "allow_forward_to: db:5432\n", 1, "allow_forward_to", "list"),
    ("forward-no-port", "allow_forward_to:\n  - db:5432\n  - db.internal\n", 3,
     "allow_forward_to[1]", "has no port"),
    ("forward-bad-cidr", "allow_forward_to:\n  - 10.0.0.1/8:443\n", 2, "allow_forward_to[0]",
     "CIDR"),
    ("metrics-no-port", "metrics_listen: localhost\n", 1, "metrics_listen", "has no port"),
    ("per-source-zero", "max_startups_per_source: 0\n", 1, "max_startups_per_source",
     "at least 1"),
    ("ban-threshold-zero", "ban_threshold: 0\n", 1, "ban_threshold", "at least 1"),
    ("ban-threshold-list", "ban_threshold: [5]\n", 1, "ban_threshold", "not a list"),
    ("ban-seconds-never", "ban_seconds: never\n", 1, "ban_seconds", "not allowed"),
    ("ban-seconds-text", "ban_seconds: a while\n", 1, "ban_seconds", "not a duration"),
    ("ban-max-below-ban", "ban_seconds: 1h\nban_max_seconds: 10m\n", 2, "ban_max_seconds",
     "at least ban_seconds (3600 s), not 600 s"),
    ("ban-above-default-max", "image: x\nban_seconds: 2d\n", 2, "ban_seconds",
     "must not exceed ban_max_seconds (86400 s)"),
    ("audit-max-size-text", "audit_max_size: big\n", 1, "audit_max_size", "not a size"),
    ("audit-max-size-zero", "audit_max_size: 0\n", 1, "audit_max_size", "greater than zero"),
    ("audit-backups-negative", "audit_backups: -1\n", 1, "audit_backups", "at least 0"),
    ("help-contact-blank", "help_contact: '  '\n", 1, "help_contact", "must not be blank"),
    ("log-level", "log_level: verbose\n", 1, "log_level", "debug, info"),
    ("image-space", "image: my image\n", 1, "image", "not a Docker image"),
    ("users-file-empty", "users_file:\n", 1, "users_file", "must not be empty"),
    ("gateway-syntax", "listen: \"0.0.0.0:2222\nimage: x\n", 1, "listen", "YAML syntax error"),
    ("gateway-not-mapping", "just a string\n", 1, None, "must be a mapping"),
    ("ciphers-weak", "listen: 0.0.0.0:22\nciphers:\n  - aes128-ctr\n  - arcfour\n", 4,
     "ciphers[1]", "unknown or weak cipher 'arcfour'"),
    ("ciphers-empty", "ciphers: []\n", 1, "ciphers", "non-empty list"),
    ("ciphers-not-list", "ciphers: aes128-ctr\n", 1, "ciphers", "non-empty list"),
    ("kex-sha1", "kex_algorithms:\n  - curve25519-sha256\n  - diffie-hellman-group1-sha1\n", 3,
     "kex_algorithms[1]", "unknown or weak key exchange algorithm 'diffie-hellman-group1-sha1'"),
    ("kex-unknown", "kex_algorithms: [curve25519-sha999]\n", 1, "kex_algorithms[0]",
     "choose from mlkem768x25519-sha256"),
    ("kex-empty", "kex_algorithms: []\n", 1, "kex_algorithms", "non-empty list"),
    ("host-key-ssh-rsa", "host_key_algorithms: [ssh-ed25519, ssh-rsa]\n", 1,
     "host_key_algorithms[1]", "unknown or weak host key algorithm 'ssh-rsa'"),
    ("host-key-twice", "host_key_algorithms: [ssh-ed25519, ssh-ed25519]\n", 1,
     "host_key_algorithms[1]", "listed twice"),
    ("macs-md5", "macs:\n  - hmac-md5\n", 2, "macs[0]", "unknown or weak MAC 'hmac-md5'"),
    ("macs-mapping", "macs: {a: 1}\n", 1, "macs", "non-empty list of MAC names"),
    ("pool-too-small", "user_network_pool: 10.1.2.0/29\n", 1, "user_network_pool",
     "too small"),
    ("pool-not-network", "user_network_pool: 10.1.2.300/24\n", 1, "user_network_pool",
     "not an IPv4 network"),
    ("pool-host-bits", "user_network_pool: 10.1.2.3/16\n", 1, "user_network_pool",
     "host bits set"),
]


def expect_error(path: Path, loader, line: int | None, field: str | None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loader(path)
    err = info.value
    first = str(err).splitlines()[0]
    prefix = f"{path}:{line}: " + (f"{field}: " if field else "")
    assert first.startswith(prefix), first
    assert (err.path, err.line, err.field) == (str(path), line, field)
    return err


@pytest.mark.parametrize(("text", "line", "field", "fragment"),
                         [c[1:] for c in BAD_USERS], ids=[c[0] for c in BAD_USERS])
def test_bad_users_file(tmp_path: Path, text: str, line: int, field: str | None,
                        fragment: str) -> None:
    path = write(tmp_path, "users.yaml", text)
    err = expect_error(path, load_users, line, field)
    assert fragment in err.message


@pytest.mark.parametrize(("text", "line", "field", "fragment"),
                         [c[1:] for c in BAD_GATEWAY], ids=[c[0] for c in BAD_GATEWAY])
def test_bad_gateway_file(tmp_path: Path, text: str, line: int, field: str | None,
                          fragment: str) -> None:
    path = write(tmp_path, "gateway.yaml", text)
    err = expect_error(path, load_gateway_config, line, field)
    assert fragment in err.message


def test_several_errors_are_all_reported_earliest_first(tmp_path: Path) -> None:
    path = write(tmp_path, "users.yaml",
                 "users:\n  alice:\n    pids: 1\n    cpus: 0\n  Bob: {}\nfoo: 1\n")
    with pytest.raises(ConfigErrors) as info:
        load_users(path)
    err = info.value
    assert [(e.line, e.field) for e in err.errors] == [
        (3, "users.alice.pids"), (4, "users.alice.cpus"), (5, "users.Bob"), (6, "foo")]
    assert (err.line, err.field) == (3, "users.alice.pids")
    assert str(err).splitlines()[0].startswith(f"{path}:3: users.alice.pids: ")
    assert len(str(err).splitlines()) == 4


def test_bad_tag_is_reported_once(tmp_path: Path) -> None:
    path = write(tmp_path, "users.yaml", "users:\n  alice:\n    shell: !!binary aGk=\n")
    with pytest.raises(ConfigError) as info:
        load_users(path)
    assert not isinstance(info.value, ConfigErrors)


def test_error_string_omits_missing_parts() -> None:
    assert str(ConfigError("a.yaml", 3, "listen", "bad")) == "a.yaml:3: listen: bad"
    assert str(ConfigError("a.yaml", None, "listen", "bad")) == "a.yaml: listen: bad"
    assert str(ConfigError("a.yaml", None, None, "bad")) == "a.yaml: bad"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_users(tmp_path / "nope.yaml")
    assert info.value.path == str(tmp_path / "nope.yaml")
    assert "cannot read" in info.value.message


def test_overrides_are_validated_and_named(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", "listen: 0.0.0.0:2222\n")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path, {"listen": "nowhere"})
    assert (info.value.path, info.value.line, info.value.field) == ("<overrides>", None, "listen")
    with pytest.raises(ConfigError, match="unknown field 'lisen'"):
        load_gateway_config(path, {"lisen": "127.0.0.1:1"})


def test_overrides_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", "gateway.yaml", "state_dir: st\nlisten: 0.0.0.0:2222\n")
    monkeypatch.chdir(tmp_path)
    gw = load_gateway_config(path, {"listen": "[::]:2200", "users_file": "u.yaml",
                                    "banner": None})
    assert gw.listen == Address("::", 2200)
    assert (gw.listen_host, gw.listen_port) == ("::", 2200)
    assert str(gw.listen) == "[::]:2200"
    assert gw.state_dir == tmp_path / "etc" / "st"  # from the file: next to the file
    assert gw.users_file == tmp_path / "u.yaml"  # from the command line: the cwd
    assert gw.banner is None


# --------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(("text", "expected"), [
    ("4g", 4 * 2**30), ("512m", 512 * 2**20), ("1.5g", 3 * 2**29), ("1024k", 2**20),
    ("4G", 4 * 2**30), ("4gb", 4 * 2**30), ("4GiB", 4 * 2**30), ("1t", 2**40),
    ("8388608", 8388608), (8388608, 8388608), ("100b", 100),
])
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4x", "-1g", "0", "g", "", "1.2.3g", True, 1.5, -3])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [
    (30, 30), (2.5, 2.5), ("45", 45), ("30s", 30), ("15m", 900), ("2h", 7200),
    ("1d", 86400), ("1h30m", 5400), ("1.5h", 5400), ("never", None), ("NEVER", None),
])
def test_parse_duration(text: object, expected: float | None) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["5 parsecs", "-5m", 0, -1, "0s", "1w", True, "", "m"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_duration_never_can_be_refused() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        parse_duration("never", allow_never=False)


@pytest.mark.parametrize(("text", "host", "port"), [
    ("0.0.0.0:2222", "0.0.0.0", 2222), ("[::]:2222", "::", 2222),
    ("localhost:0", "localhost", 0), ("[fe80::1]:22", "fe80::1", 22),
])
def test_parse_address(text: str, host: str, port: int) -> None:
    assert parse_address(text) == Address(host, port)


def test_gateway_values(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway.yaml", """\
listen: "[::]:2022"
users_file: /etc/dgw/users.yaml
state_dir: state
audit_log: /var/log/dgw-audit.log
docker_host: unix:///run/docker.sock
idle_timeout: 15m
idle_policy: strict
ready_timeout: 2m
security_profile: sysbox
metrics_listen: 127.0.0.1:9133
banner: yes
allow_forward_to:
  - db.internal:5432
  - "*.svc.local:*"
  - 10.20.0.0/16:443
  - "[2001:db8::/32]:80"
""")
    gw = load_gateway_config(path)
    assert gw.listen == Address("::", 2022)
    assert gw.users_file == Path("/etc/dgw/users.yaml")
    assert gw.state_dir == tmp_path / "state"
    assert gw.audit_log == Path("/var/log/dgw-audit.log")
    assert gw.docker_url() == "unix:///run/docker.sock"
    assert (gw.idle_timeout, gw.idle_policy, gw.ready_timeout) == (900, "strict", 120)
    assert gw.security_profile == "sysbox"
    assert gw.metrics_listen == Address("127.0.0.1", 9133)
    assert gw.banner == "yes"  # a string field keeps the text, not YAML's boolean
    assert gw.forward_allowed("db.internal", 5432)
    assert not gw.forward_allowed("db.internal", 5433)
    assert gw.forward_allowed("redis.svc.local", 6379)
    assert gw.forward_allowed("10.20.3.4", 443)
    assert not gw.forward_allowed("10.21.3.4", 443)
    assert gw.forward_allowed("2001:db8::7", 80)
    assert not gw.forward_allowed("evil.example", 5432)


def test_guard_and_audit_values(tmp_path: Path) -> None:
    gw = load_gateway_config(write(tmp_path, "gateway.yaml", """\
max_startups: 20
max_startups_per_source: 3
ban_threshold: 5
ban_seconds: 30s
ban_max_seconds: 2h
audit_max_size: 10m
audit_backups: 0
help_contact: "#devbox on chat, or admin@example.com"
"""))
    assert (gw.max_startups, gw.max_startups_per_source) == (20, 3)
    assert (gw.ban_threshold, gw.ban_seconds, gw.ban_max_seconds) == (5, 30, 7200)
    assert (gw.audit_max_size, gw.audit_backups) == (10 * 2**20, 0)
    assert gw.help_contact == "#devbox on chat, or admin@example.com"
    # equal is fine; a first ban beyond the default maximum is fine if the maximum follows
    gw = load_gateway_config(write(tmp_path, "g2.yaml", "ban_seconds: 2d\nban_max_seconds: 2d\n"))
    assert gw.ban_seconds == gw.ban_max_seconds == 172800


def test_audit_log_null_and_relative(tmp_path: Path) -> None:
    gw = load_gateway_config(write(tmp_path, "g.yaml", "audit_log: null\n"))
    assert gw.audit_log is None
    gw = load_gateway_config(write(tmp_path, "g.yaml", "state_dir: /srv/s\naudit_log: a/b.log\n"))
    assert gw.audit_log == Path("/srv/s/a/b.log")


def test_docker_url_from_environment() -> None:
    gw = GatewayConfig.default()
    assert gw.docker_url({}) == "unix:///var/run/docker.sock"
    assert gw.docker_url({"DOCKER_HOST": "unix:///x.sock"}) == "unix:///x.sock"
    with pytest.raises(ConfigError, match="only unix://"):
        gw.docker_url({"DOCKER_HOST": "tcp://1.2.3.4:2375"})


def test_empty_gateway_file_is_all_defaults(tmp_path: Path) -> None:
    gw = load_gateway_config(write(tmp_path, "gateway.yaml", "# nothing here\n"))
    assert gw.listen == Address("0.0.0.0", 2222)
    assert gw.users_file == tmp_path / "users.yaml"


# --------------------------------------------------------------------------------------------
# users.yaml semantics


@pytest.mark.parametrize("text", ["", "# only a comment\n", "defaults:\n  cpus: 1\n",
                                  "users:\n", "users: {}\n"])
def test_no_users_is_valid(tmp_path: Path, text: str) -> None:
    config = load_users(write(tmp_path, "users.yaml", text))
    assert dict(config.users) == {}


def test_example_bob_block_is_valid_once_uncommented(tmp_path: Path) -> None:
    text = (REPO / "config" / "users.yaml").read_text()
    text = text.replace("  # bob:", "  bob:").replace("  #   ", "    ").replace("AAAA...", "X")
    text = text.replace("ssh-ed25519 X", KEY.rsplit(" ", 1)[0])
    bob = load_users(write(tmp_path, "users.yaml", text)).user("bob")
    assert bob is not None and len(bob.keys) == 2
    assert (bob.cpus, bob.memory, bob.pids, bob.max_sessions) == (4.0, 8 * 2**30, 4000, 4)
    assert bob.keys[0].matches_peer("10.1.1.1") and not bob.keys[0].matches_peer("10.0.0.13")
    assert not bob.keys[0].allows_port_forwarding
    assert bob.keys[1].allows_pty and not bob.keys[1].allows_port_forwarding
    assert bob.keys[1].expires_at == datetime(2026, 12, 31, tzinfo=UTC)


def test_yaml_words_as_user_names_and_anchors(tmp_path: Path) -> None:
    config = load_users(write(tmp_path, "users.yaml",
                              "users:\n  no: &lim\n    cpus: 1\n  on: *lim\n  null: {}\n"))
    assert sorted(config.users) == ["no", "null", "on"]
    assert config.user("on").cpus == 1.0


def test_defaults_inheritance(tmp_path: Path) -> None:
    path = write(tmp_path, "users.yaml", f"""\
defaults:
  cpus: 2
  memory: 4g
  pids: 2000
  idle_timeout: 1h
users:
  alice:
    keys: {KEY}
  bob:
    memory: 8g
    cpus: unlimited
    idle_timeout: never
    max_sessions: 2
    shell: /bin/zsh
  carol:
    pids: 100
    disabled: true
    idle_timeout: 30m
""")
    config = load_users(path)
    alice, bob, carol = (config.user(n) for n in ("alice", "bob", "carol"))
    assert (alice.cpus, alice.memory, alice.pids) == (2.0, 4 * 2**30, 2000)
    assert (bob.cpus, bob.memory, bob.pids) == (None, 8 * 2**30, 2000)
    assert (carol.cpus, carol.memory, carol.pids) == (2.0, 4 * 2**30, 100)
    assert (alice.line, bob.line, carol.line) == (7, 9, 15)
    gw = GatewayConfig.default(idle_timeout="15m", max_sessions=3)
    assert alice.effective_idle_timeout(gw) == 3600
    assert bob.effective_idle_timeout(gw) is None
    assert carol.effective_idle_timeout(gw) == 1800
    assert (alice.effective_max_sessions(gw), bob.effective_max_sessions(gw)) == (3, 2)
    assert bob.shell == "/bin/zsh" and alice.shell is None
    assert carol.disabled and not carol.can_log_in
    assert not bob.can_log_in  # no keys, no password: valid, but nobody can log in as bob
    assert alice.can_log_in


def test_idle_timeout_inherits_gateway_without_defaults(tmp_path: Path) -> None:
    config = load_users(write(tmp_path, "users.yaml", "users:\n  alice: {}\n  bob:\n"))
    alice = config.user("alice")
    assert alice.idle_timeout is INHERIT and alice.max_sessions is None
    assert (alice.cpus, alice.memory, alice.pids) == (None, None, None)
    assert alice.effective_idle_timeout(GatewayConfig.default(idle_timeout=600)) == 600
    assert alice.effective_idle_timeout(GatewayConfig.default()) is None
    assert config.user("bob") is not None


def test_disabled_from_defaults(tmp_path: Path) -> None:
    config = load_users(write(tmp_path, "users.yaml",
                              "defaults:\n  disabled: true\nusers:\n  a: {}\n  b:\n"
                              "    disabled: false\n"))
    assert config.user("a").disabled and not config.user("b").disabled


def test_duplicate_and_shared_keys_are_fine(tmp_path: Path) -> None:
    config = load_users(write(tmp_path, "users.yaml",
                              f"users:\n  a:\n    keys:\n      - {KEY}\n      - {KEY}\n"
                              f"  b:\n    keys: [{KEY}]\n"))
    assert len(config.user("a").keys) == 2
    assert config.user("a").keys[0].fingerprint == config.user("b").keys[0].fingerprint
    assert [k.line for k in config.user("a").keys] == [4, 5]


def test_users_config_is_immutable_and_hashes_content(tmp_path: Path) -> None:
    path = write(tmp_path, "users.yaml", "users:\n  alice: {}\n")
    first = load_users(path)
    with pytest.raises(TypeError):
        first.users["mallory"] = first.user("alice")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.user("alice").disabled = True  # type: ignore[misc]
    assert load_users(path).digest == first.digest
    path.write_text("users:\n  alice: {}\n  bob: {}\n")
    second = load_users(path)
    assert second.digest != first.digest
    assert second.mtime_ns is not None
    assert first.user("bob") is None  # the old object is untouched


def test_parse_users_from_text() -> None:
    config = parse_users("users:\n  alice: {}\n")
    assert config.path is None and config.user("alice").name == "alice"
    with pytest.raises(ConfigError, match=r"^<users>:2: users.Alice: "):
        parse_users("users:\n  Alice: {}\n")


@pytest.mark.parametrize("make", [
    lambda: bcrypt.hash("s3cret"),
    lambda: bcrypt.using(ident="2a").hash("s3cret"),
    lambda: bcrypt.using(ident="2y").hash("s3cret"),
    lambda: sha512_crypt.hash("s3cret"),
    lambda: sha256_crypt.hash("s3cret"),
    lambda: "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHRzYWx0$bWNhR3lcgaXnYM9Rp5TEOq1iFRoh9W9Wo"
            "uG1ESVC6g0",
])
def test_password_hashes_accepted(tmp_path: Path, make) -> None:
    hashed = make()
    config = load_users(write(tmp_path, "users.yaml",
                              f"users:\n  alice:\n    password: '{hashed}'\n"))
    alice = config.user("alice")
    assert alice.password == hashed
    assert alice.has_password_auth and alice.can_log_in


def test_unquoted_bcrypt_hash_works(tmp_path: Path) -> None:
    hashed = bcrypt.hash("x")
    config = load_users(write(tmp_path, "users.yaml", f"users:\n  a:\n    password: {hashed}\n"))
    assert config.user("a").password == hashed


# --------------------------------------------------------------------------------------------
# Key lines and their options


def test_plain_key() -> None:
    entry = parse_authorized_key(KEY, 7)
    assert entry.line == 7 and entry.text == KEY
    assert entry.key == _PRIVATE.convert_to_public()
    assert entry.fingerprint == _PRIVATE.get_fingerprint()
    assert entry.comment == "test@example"
    assert entry.allows_pty and entry.allows_port_forwarding
    assert entry.forced_command is None and entry.environment == {}
    assert entry.permitopen is None and entry.expires_at is None
    assert entry.matches_peer("203.0.113.9")


@pytest.mark.parametrize(("option", "ip", "expected"), [
    ('from="10.0.0.0/8"', "10.1.2.3", True),
    ('from="10.0.0.0/8"', "192.168.1.1", False),
    ('from="10.0.0.0/8,!10.0.0.5"', "10.0.0.5", False),
    ('from="10.0.0.0/8,!10.0.0.5"', "10.0.0.6", True),
    ('from="*,!203.0.113.0/24"', "203.0.113.7", False),
    ('from="*,!203.0.113.0/24"', "198.51.100.1", True),
    ('from="192.168.1.*"', "192.168.1.77", True),
    ('from="192.168.1.*"', "192.168.2.77", False),
    ('from="192.168.1.?"', "192.168.1.7", True),
    ('from="2001:db8::/32"', "2001:db8::1", True),
    ('from="2001:db8::/32"', "2001:db9::1", False),
    ('from="10.0.0.0/8"', "::ffff:10.9.9.9", True),
    ('from="10.0.0.0/8",from="10.1.0.0/16"', "10.1.0.1", True),
    ('from="10.0.0.0/8",from="10.1.0.0/16"', "10.2.0.1", False),
    ('from="*.example.com"', "10.0.0.1", False),
    ('from="10.0.0.0/8"', "not-an-ip", False),
])
def test_from_matching(option: str, ip: str, expected: bool) -> None:
    assert one_key(f"{option} {KEY}").matches_peer(ip) is expected


def test_from_patterns_kept() -> None:
    entry = one_key(f'from="10.0.0.0/8,!10.0.0.5",from="*" {KEY}')
    assert entry.from_patterns == ("10.0.0.0/8,!10.0.0.5", "*")


def test_expiry() -> None:
    now = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
    past = one_key(f'expiry-time="20300531" {KEY}')
    assert past.expires_at == datetime(2030, 5, 31, tzinfo=UTC)
    assert past.is_expired(now)
    future = one_key(f'expiry-time="203006011201" {KEY}')
    assert future.expires_at == datetime(2030, 6, 1, 12, 1, tzinfo=UTC)
    assert not future.is_expired(now)
    assert future.is_expired(now + timedelta(minutes=1))
    assert future.is_expired(datetime(2031, 1, 1))  # naive: taken as UTC
    seconds = one_key(f'expiry-time="20300601120030Z" {KEY}')
    assert seconds.expires_at == datetime(2030, 6, 1, 12, 0, 30, tzinfo=UTC)
    earliest = one_key(f'expiry-time="20310101",expiry-time="20300101" {KEY}')
    assert earliest.expires_at == datetime(2030, 1, 1, tzinfo=UTC)
    assert not one_key(KEY).is_expired()
    assert one_key(f'expiry-time="20000101" {KEY}').is_expired()


@pytest.mark.parametrize(("options", "pty", "forwarding"), [
    ("restrict", False, False),
    ("restrict,pty", True, False),
    ("restrict,port-forwarding", False, True),
    ("restrict,pty,port-forwarding", True, True),
    ("no-pty", False, True),
    ("no-port-forwarding", True, False),
    ("restrict,pty,no-pty", False, False),
    ("pty", True, True),
])
def test_restrict_semantics(options: str, pty: bool, forwarding: bool) -> None:
    entry = one_key(f"{options} {KEY}")
    assert (entry.allows_pty, entry.allows_port_forwarding) == (pty, forwarding)
    assert entry.restrict is ("restrict" in options)


def test_permitopen() -> None:
    entry = one_key(f'permitopen="db:5432",permitopen="[::1]:22",permitopen="cache:*" {KEY}')
    assert entry.permitopen == [("::1", 22), ("cache", None), ("db", 5432)]


def test_command_and_environment() -> None:
    entry = one_key(f'command="echo \\"hi there\\"",environment="A=1",'
                    f'environment="B=x=y",no-agent-forwarding {KEY}')
    assert entry.forced_command == 'echo "hi there"'
    assert entry.environment == {"A": "1", "B": "x=y"}


def test_options_with_quoted_spaces() -> None:
    entry = one_key(f'command="ls -l /tmp",from="10.0.0.0/8" {KEY}')
    assert entry.forced_command == "ls -l /tmp"
    assert entry.key == _PRIVATE.convert_to_public()


def test_find_key(tmp_path: Path) -> None:
    config = load_users(write(tmp_path, "users.yaml", f"""\
users:
  alice:
    keys:
      - from="10.0.0.0/8",expiry-time="20000101" {KEY}
      - from="10.0.0.0/8",no-pty {KEY}
      - {KEY2}
"""))
    alice = config.user("alice")
    public = _PRIVATE.convert_to_public()
    found = alice.find_key(public, "10.1.1.1")
    assert found is not None and found.line == 5 and not found.allows_pty
    assert alice.find_key(public, "192.168.0.1") is None
    other = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    assert alice.find_key(other, "10.1.1.1") is None


# --------------------------------------------------------------------------------------------
# Groups (issue 16): defaults <- groups (in file order) <- the user's own


GROUPS = f"""\
defaults:
  memory: 2g
  cpus: 1
groups:
  ml:
    members: [alice, bob]
    image: team/ml:1
    memory: 8g
    volumes:
      data: {{path: /srv/data, size: 50g}}
      models: {{path: /srv/models, size: 1g, read_only: true}}
  web:
    members: [bob, carol]
    pids: 500
    volumes:
      site: {{path: /srv/site, size: 300m}}
users:
  alice: {{keys: ['{KEY}']}}
  bob:
    keys: ['{KEY}']
    image: bob/own:2
  carol: {{keys: ['{KEY}'], memory: 1g}}
  dave: {{keys: ['{KEY}']}}
"""


def test_groups_layering(tmp_path: Path) -> None:
    cfg = load_users(write(tmp_path, "users.yaml", GROUPS))
    alice, bob, carol, dave = (cfg.users[n] for n in ("alice", "bob", "carol", "dave"))
    assert cfg.groups["ml"].members == ("alice", "bob")
    assert (alice.groups, bob.groups, carol.groups, dave.groups) == (
        ("ml",), ("ml", "web"), ("web",), ())
    # the group's value over defaults, her own over the group's
    assert (alice.memory, alice.cpus, alice.image, alice.pids) == (8 << 30, 1.0, "team/ml:1", None)
    assert (bob.memory, bob.image, bob.pids) == (8 << 30, "bob/own:2", 500)
    assert (carol.memory, carol.image, carol.pids) == (1 << 30, None, 500)
    assert (dave.memory, dave.image, dave.volumes) == (2 << 30, None, ())
    assert [(v.group, v.name, v.path, v.size, v.read_only) for v in bob.volumes] == [
        ("ml", "data", "/srv/data", 50 << 30, False),
        ("ml", "models", "/srv/models", 1 << 30, True),
        ("web", "site", "/srv/site", 300 << 20, False)]
    assert [v.name for v in carol.volumes] == ["site"]
    assert [(i.field, i.line, i.ref) for i in cfg.images] == [
        ("groups.ml.image", 7, "team/ml:1"), ("users.bob.image", 21, "bob/own:2")]


def test_groups_conflict_needs_the_user_to_choose(tmp_path: Path) -> None:
    text = GROUPS.replace("    pids: 500\n", "    pids: 500\n    memory: 4g\n")
    err = expect_error(write(tmp_path, "users.yaml", text), load_users, 15, "groups.web.memory")
    assert "differs from groups.ml.memory (line 8) for their member bob" in err.message
    assert "set users.bob.memory to choose" in err.message
    # once bob chooses, the file is good; carol (only in web) gets web's value
    fixed = text.replace("    image: bob/own:2\n", "    image: bob/own:2\n    memory: 3g\n")
    cfg = load_users(write(tmp_path, "users.yaml", fixed))
    assert (cfg.users["bob"].memory, cfg.users["carol"].memory) == (3 << 30, 1 << 30)
    # equal values are no conflict
    same = GROUPS.replace("    pids: 500\n", "    pids: 500\n    memory: 8g\n")
    assert load_users(write(tmp_path, "users.yaml", same)).users["bob"].memory == 8 << 30


BAD_GROUPS = [
    ("unknown-member",
     "groups:\n  ml:\n    members: [alice, bbo]\nusers:\n  alice: {}\n  bob: {}\n",
     3, "groups.ml.members[1]", "no user 'bbo' in users: (did you mean 'bob'?)"),
    ("member-twice", "groups:\n  ml:\n    members:\n      - alice\n      - alice\n"
     "users:\n  alice: {}\n", 5, "groups.ml.members[1]", "listed twice"),
    ("members-not-list", "groups:\n  ml:\n    members: alice\n", 3, "groups.ml.members",
     "must be a list of user names"),
    ("bad-group-name", "groups:\n  ML:\n    members: []\n", 2, "groups.ML", "invalid group name"),
    ("group-not-mapping", "groups:\n  ml: [alice]\n", 2, "groups.ml", "must be a mapping"),
    ("groups-not-mapping", "groups: [ml]\n", 1, "groups", "must be a mapping"),
    ("unknown-group-field", "groups:\n  ml:\n    memebers: []\n", 3, "groups.ml.memebers",
     "did you mean 'members'"),
    ("keys-in-group", "groups:\n  ml:\n    keys: []\n", 3, "groups.ml.keys", "per-user"),
    ("group-memory-bad", "groups:\n  ml:\n    memory: 4x\n", 3, "groups.ml.memory", "'4x'"),
    ("group-image-bad", "groups:\n  ml:\n    image: 'Team/ML latest'\n", 3, "groups.ml.image",
     "not an image reference"),
    ("user-image-bad", "users:\n  alice:\n    image: ':x'\n", 3, "users.alice.image",
     "not an image reference"),
    ("volumes-not-mapping", "groups:\n  ml:\n    volumes: [/srv]\n", 3, "groups.ml.volumes",
     "must be a mapping of volume name"),
    ("volume-bad-name", "groups:\n  ml:\n    volumes:\n      Data: {path: /srv/d, size: 1g}\n",
     4, "groups.ml.volumes.Data", "invalid volume name"),
    ("volume-no-size", "groups:\n  ml:\n    volumes:\n      data:\n        path: /srv/d\n",
     4, "groups.ml.volumes.data", "needs size:"),
    ("volume-empty", "groups:\n  ml:\n    volumes:\n      data:\n",
     4, "groups.ml.volumes.data", "must be a mapping"),
    ("volume-relative", "groups:\n  ml:\n    volumes:\n      data: {path: srv/d, size: 1g}\n",
     4, "groups.ml.volumes.data.path", "absolute path"),
    ("volume-reserved", "groups:\n  ml:\n    volumes:\n      data:\n        path: /home/x\n"
     "        size: 1g\n", 5, "groups.ml.volumes.data.path", "inside /home"),
    ("volume-not-normal",
     "groups:\n  ml:\n    volumes:\n      data: {path: /srv/../etc, size: 1g}\n",
     4, "groups.ml.volumes.data.path", "not a normal path"),
    ("volume-too-small", "groups:\n  ml:\n    volumes:\n      data: {path: /srv/d, size: 1m}\n",
     4, "groups.ml.volumes.data.size", "at least 300m"),
    ("volume-ro-bad", "groups:\n  ml:\n    volumes:\n      data:\n        path: /srv/d\n"
     "        size: 1g\n        read_only: sure\n", 7, "groups.ml.volumes.data.read_only",
     "true or false"),
    ("volume-unknown-field", "groups:\n  ml:\n    volumes:\n      data:\n        path: /srv/d\n"
     "        size: 1g\n        readonly: true\n", 7, "groups.ml.volumes.data.readonly",
     "did you mean 'read_only'"),
    ("volume-same-path", "groups:\n  ml:\n    volumes:\n      a: {path: /srv/d, size: 1g}\n"
     "      b:\n        path: /srv/d\n        size: 1g\n", 6, "groups.ml.volumes.b.path",
     "also the path of groups.ml.volumes.a (line 4)"),
    ("volume-same-path-two-groups",
     "groups:\n  ml:\n    members: [alice]\n    volumes:\n      a: {path: /srv/d, size: 1g}\n"
     "  web:\n    members: [alice]\n    volumes:\n      b: {path: /srv/d, size: 1g}\n"
     "users:\n  alice: {}\n", 9, "groups.web.volumes.b",
     "also where groups.ml.volumes.a (line 5) is mounted for their member alice"),
]


@pytest.mark.parametrize(("text", "line", "field", "fragment"),
                         [c[1:] for c in BAD_GROUPS], ids=[c[0] for c in BAD_GROUPS])
def test_bad_groups(tmp_path: Path, text: str, line: int, field: str, fragment: str) -> None:
    err = expect_error(write(tmp_path, "users.yaml", text), load_users, line, field)
    assert fragment in err.message, err.message


def test_defaults_image_and_empty_groups(tmp_path: Path) -> None:
    cfg = load_users(write(tmp_path, "users.yaml",
                           "defaults:\n  image: registry:5000/t/dind@sha256:" + "a" * 64 +
                           "\ngroups:\n  empty:\n  none:\n    members: []\nusers:\n  alice:\n"))
    assert cfg.users["alice"].image == "registry:5000/t/dind@sha256:" + "a" * 64
    assert cfg.users["alice"].groups == ()
    assert set(cfg.groups) == {"empty", "none"}


def test_example_groups_block_is_valid_once_uncommented(tmp_path: Path) -> None:
    text = (REPO / "config" / "users.yaml").read_text().replace("#| ", "")
    text = text.replace("  # bob:", "  bob:").replace("  #   ", "    ").replace("AAAA...", "X")
    text = text.replace("ssh-ed25519 X", KEY.rsplit(" ", 1)[0])
    cfg = load_users(write(tmp_path, "users.yaml", text))
    bob = cfg.user("bob")
    assert bob is not None and bob.groups == ("ml",) and bob.image == "dind-gateway/dind:latest"
    assert bob.memory == 8 * 2**30  # his own value wins over the group's
    assert cfg.users["alice"].memory == 6 * 2**30  # the group's over defaults
    assert [(v.path, v.read_only) for v in bob.volumes] == [("/srv/datasets", True),
                                                             ("/srv/scratch", False)]
