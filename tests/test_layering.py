"""Imports only go down: app -> inspector -> runtime -> kernels, and no cycles inside runtime/.

Every module's imports are read with `ast`, the ones inside functions included (and
`importlib.import_module("...")` with a literal name). The rules (docs/architecture.md):
- no upward import between the layers app > inspector > runtime > kernels;
- inspector/ reads runtime only through runtime.telemetry (the snapshots);
- runtime/kv/ does not import the scheduler, the engine or the engine's cache stack;
- runtime/weights/ does not import runtime/models/ (models load weights, not the reverse);
- no import cycle among runtime's parts, taken at package level: the sub-packages (kv, models,
  weights, integrity, layersplit) and the top-level modules (engine, scheduler, ...).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("app", "inspector", "runtime", "kernels")  # top to bottom
RANK = {name: i for i, name in enumerate(LAYERS)}
INSPECTOR_MAY_USE = ("runtime.telemetry",)
KV_MUST_NOT_USE = ("runtime.scheduler", "runtime.engine", "runtime.cache_stack")

# Modules allowed to break a rule, with the reason (none today: the developer tools that imported
# upward moved into app/ CLI modes, issue 16). An entry is checked by
# test_known_exception_is_still_needed (strict xfail): once its module no longer breaks a rule,
# that test passes, which fails the run: then drop the entry.
KNOWN_EXCEPTIONS: dict[str, str] = {}


# ---- reading the imports ------------------------------------------------------------------------
def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_pkg: bool, level: int, module: str | None) -> str:
    """Absolute name of a (possibly relative) `from ... import` base."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """Every project module `path` imports, anywhere in the file."""
    me, is_pkg = module_name(path, root), path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(me, is_pkg, node.level, node.module)
            for a in node.names:  # `from runtime import engine` imports runtime.engine
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.add(node.args[0].value)
    return {m for m in out if m.split(".")[0] in RANK}


@functools.cache
def project_graph() -> dict[str, set[str]]:
    files = [p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


# ---- the rules ----------------------------------------------------------------------------------
def _within(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def part(mod: str) -> str | None:
    """The runtime part a module belongs to (runtime.kv, runtime.engine, ...), else None."""
    bits = mod.split(".")
    return ".".join(bits[:2]) if bits[0] == "runtime" and len(bits) > 1 else None


def edge_violations(src: str, dst: str) -> list[str]:
    out = []
    a, b = src.split(".")[0], dst.split(".")[0]
    if RANK[b] < RANK[a]:
        out.append(f"upward import: {src} -> {dst} ({a}/ sits below {b}/)")
    if a == "inspector" and b == "runtime" and not any(_within(dst, m) for m in INSPECTOR_MAY_USE):
        out.append(f"inspector reads runtime only through runtime.telemetry: {src} -> {dst}")
    if _within(src, "runtime.kv") and any(_within(dst, m) for m in KV_MUST_NOT_USE):
        out.append(f"kv/ imports what builds on it: {src} -> {dst}")
    if _within(src, "runtime.weights") and _within(dst, "runtime.models"):
        out.append(f"weights/ imports models/ (models import weights): {src} -> {dst}")
    return out


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (more than one part) of runtime's part-level graph."""
    adj: dict[str, set[str]] = {}
    for src, dsts in graph.items():
        for dst in dsts:
            a, b = part(src), part(dst)
            if a and b and a != b:
                adj.setdefault(a, set()).add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has a few dozen nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(adj.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return found


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    out = [
        v for src in sorted(graph) for dst in sorted(graph[src]) for v in edge_violations(src, dst)
    ]
    for comp in cycles(graph):
        edges = [
            f"{s} -> {d}"
            for s in sorted(graph)
            for d in sorted(graph[s])
            if part(s) in comp and part(d) in comp and part(s) != part(d)
        ]
        out.append(f"import cycle among {comp}: " + "; ".join(edges))
    return out


def _without(graph: Mapping[str, set[str]], mods) -> dict[str, set[str]]:
    return {m: d for m, d in graph.items() if m not in mods}


# ---- the tests ----------------------------------------------------------------------------------
def test_imports_only_go_down_and_runtime_has_no_cycle():
    graph = project_graph()
    assert len(graph) > 100, "the scan found too few modules: wrong ROOT?"
    bad = violations(_without(graph, KNOWN_EXCEPTIONS))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod", sorted(KNOWN_EXCEPTIONS))
@pytest.mark.xfail(strict=True, reason="known upward import; drop the KNOWN_EXCEPTIONS entry")
def test_known_exception_is_still_needed(mod):
    graph = project_graph()
    others = _without(graph, set(KNOWN_EXCEPTIONS) - {mod})
    bad = [v for v in violations(others) if mod in v]
    assert not bad, f"{mod} ({KNOWN_EXCEPTIONS[mod]}):\n" + "\n".join(bad)


def test_checker_flags_a_bad_graph():
    """Negative control: each rule fires on a synthetic graph that breaks it."""
    bad = {
        "kernels.rope": {"runtime.models.base"},  # kernels -> runtime
        "runtime.engine": {"inspector.app", "runtime.kv.pool"},  # runtime -> inspector
        "inspector.app": {"runtime.engine", "runtime.telemetry"},  # beyond telemetry
        "runtime.kv.stack": {"runtime.scheduler"},  # kv -> scheduler
        "runtime.scheduler": {"runtime.kv.tier_controller"},  # ... which closes a cycle
        "runtime.weights.cache": {"runtime.models.layers"},  # weights -> models
        "runtime.models.base": {"runtime.weights.cache"},
    }
    found = "\n".join(violations(bad))
    assert "upward import: kernels.rope -> runtime.models.base" in found
    assert "upward import: runtime.engine -> inspector.app" in found
    assert (
        "inspector reads runtime only through runtime.telemetry: inspector.app -> runtime.engine"
        in found
    )
    assert "telemetry: inspector.app -> runtime.telemetry" not in found
    assert "kv/ imports what builds on it: runtime.kv.stack -> runtime.scheduler" in found
    assert "weights/ imports models/" in found
    assert "import cycle among ['runtime.kv', 'runtime.scheduler']" in found
    assert "import cycle among ['runtime.models', 'runtime.weights']" in found
    # a clean graph passes
    assert not violations({"app.cli": {"runtime.engine"}, "runtime.engine": {"runtime.kv.pool"}})


def test_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "runtime" / "kv"
    pkg.mkdir(parents=True)
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text(
        "def f():\n    from runtime.scheduler import Scheduler\n"
        "from . import y\nfrom .. import engine\n"
        "import importlib\nimportlib.import_module('kernels.rope')\n"
    )
    known = {"runtime.kv.y", "runtime.engine", "runtime.scheduler"}
    got = imports_of(pkg / "x.py", known, tmp_path)
    assert got == {"runtime.scheduler", "runtime.kv.y", "runtime.engine", "kernels.rope"}
