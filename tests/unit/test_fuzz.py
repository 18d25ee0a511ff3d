"""Property-based: whatever bytes an admin (or an editor crash) leaves in a config file, the
loaders give a config or a `file:line: field: message` error, never a traceback; whatever a
key line says, it parses or gives a ValueError with a reason.  Bounded: a fixed example budget
per property so CI time stays small (HYPOTHESIS_PROFILE=long for more)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.auth import parse_authorized_key
from gateway.config import ConfigError, load_gateway_config, load_users

settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LOCATED = re.compile(r"^\S+?(:\d+)?: ")  # "file:line: ..." or "file: ..." (no line for bytes)

# YAML-shaped text: keys and values of both files, indentation, flow styles, anchors, tags
TOKENS = st.sampled_from([
    "users:", "defaults:", "groups:", "alice:", "bob:", "keys:", "- ", "  ", "    ", "\n",
    "cpus: ", "memory: ", "pids: ", "disk: ", "shell: ", "password: ", "disabled: ", "image: ",
    "members: [alice]", "volumes:", "path: /srv/x", "size: 1g", "idle_timeout: ", "never",
    "listen: ", "0.0.0.0:2222", "prefix: ", "ciphers: [", "]", "{", "}", ",", "&a ", "*a",
    "!!python/object:os.system ", "<<: ", "'", '"', "#", "ssh-ed25519 AAAA", "2", "0.5", "-1",
    "4g", "1e9", "null", "~", "yes", "true", "restrict,", 'command="x" ', "\t", "\r", "\x00",
    "é", "\ufeff",
])
YAMLISH = st.lists(TOKENS, max_size=40).map("".join)


def _check(load, path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        load(path)
    except ConfigError as exc:
        text = str(exc)
        assert text and LOCATED.match(text.splitlines()[0]), text
        assert "Traceback" not in text


@given(data=st.one_of(st.binary(max_size=400), YAMLISH.map(str.encode)))
def test_users_file_never_crashes(tmp_path: Path, data: bytes) -> None:
    _check(load_users, tmp_path / "users.yaml", data)


@given(data=st.one_of(st.binary(max_size=400), YAMLISH.map(str.encode)))
def test_gateway_file_never_crashes(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "users.yaml").write_text("users: {}\n")
    _check(load_gateway_config, tmp_path / "gateway.yaml", data)


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x"
OPTIONS = st.lists(st.sampled_from([
    "restrict", "no-pty", "pty", "no-port-forwarding", "agent-forwarding",
    'command="echo hi"', 'environment="A=b"', 'from="10.0.0.0/8"', 'from="*,!1.2.3.4"',
    'permitopen="localhost:80"', 'permitlisten="7000"', 'expiry-time="20991231"',
    'principals="alice"', "cert-authority", 'command="', "no-ptty", '="', ",", " ", "\\",
    'permitopen="x"', 'expiry-time="yesterday"', "PTY",
]), max_size=6).map(",".join)


@given(options=OPTIONS, tail=st.text(max_size=30))
def test_key_lines_parse_or_say_why(options: str, tail: str) -> None:
    line = f"{options} {KEY}{tail}" if options else f"{KEY}{tail}"
    try:
        parse_authorized_key(line, 1)
    except ValueError as exc:
        assert str(exc), line


@pytest.mark.parametrize("junk", [b"", b"\x00" * 10, b"users:\n  - [\n", b"\xff\xfe\x00"])
def test_known_bad_bytes(tmp_path: Path, junk: bytes) -> None:
    _check(load_users, tmp_path / "users.yaml", junk)
