"""The layout holds: no import loops, nothing imports the composition root, and the SSH layer
and services see only the backend contract, never an implementation (issue: one contract,
many backends).  Read from the source, so it fails the moment someone adds such an import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "gateway"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """gateway.* modules this file imports (anywhere in it, conditional or not)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gateway")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("gateway"):
                continue
            out.add(target)
            for alias in node.names:  # `from . import forwarding` names a module
                if (PKG.parent / (target + "." + alias.name).replace(".", "/")).with_suffix(
                        ".py").exists():
                    out.add(f"{target}.{alias.name}")
    return out - {me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_the_parser_sees_imports() -> None:
    g = graph()
    assert "gateway.backend.base" in g["gateway.ssh.context"]
    assert "gateway.ssh.forwarding" in g["gateway.ssh.server"]  # `from . import forwarding`


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, as found by depth-first search (module → … → module)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if dep not in g:
                continue
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node)
    return found


def test_no_import_loops() -> None:
    # a package importing its own submodule (re-export) is not a loop of concerns
    g = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph().items()}
    assert cycles(g) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_nothing_imports_the_app() -> None:
    importers = sorted(m for m, deps in graph().items() if "gateway.app" in deps)
    assert importers == ["gateway.__main__"]


@pytest.mark.parametrize("layer", ["gateway.ssh", "gateway.services", "gateway.observe",
                                   "gateway.config", "gateway.cli"])
def test_layers_use_only_the_backend_contract(layer: str) -> None:
    bad = {m: sorted(d for d in deps if d.startswith("gateway.backend.")
                     and d != "gateway.backend.base")
           for m, deps in graph().items() if m == layer or m.startswith(layer + ".")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_every_module_says_its_concern() -> None:
    missing = [module_name(p) for p in PKG.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
