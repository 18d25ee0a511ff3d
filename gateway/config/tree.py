"""A located YAML tree and the error types: every value remembers its file and line.

Admins edit these files by hand and users.yaml is live-reloaded, so every problem must be
reported as ``file:line: field: message`` and a bad file must never half-apply. We therefore
compose the YAML into nodes (keeping line numbers), walk them ourselves (PyYAML silently
keeps the last of duplicate keys; we reject them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.constructor import ConstructorError, SafeConstructor


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


