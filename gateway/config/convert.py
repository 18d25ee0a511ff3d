"""Field converters over the located tree, and the scalar parsers behind them.

A converter is ``(node, field, errs) -> value``; on a bad value it records
``file:line: field: message`` (with a hint where one helps) and returns ``_BAD``, so one pass
reports every error of a file.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..auth import parse_port
from .tree import _BAD, _dotted, _Errors, _Node

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


