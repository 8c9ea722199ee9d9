"""The package reads as the pipeline: imports run one way between the stages, and no two
modules import each other (directly or round a longer loop).

Stages, from the bottom up (a module may import its own stage and the stages below it):

==========  ============================================================================
rank        stages
==========  ============================================================================
0           ``closed_forms`` (one weight matrix), ``models`` (small models, MiniLM)
1           ``graph`` (the graph and its operators)
2           ``formats`` (model files), ``capture`` (``torch.export``), ``bounds``
3           ``radii``
4           ``certificate``
5           ``check`` (the independent checker), ``attacks``
6           ``testing``
7           ``cli``
==========  ============================================================================

The checker is narrower still: it reads the graph's structure, the closed forms and the
certificate's formats (``certify.certificate.schema``, ``compression_document``), never the torch bounds, radii or
capture that made the certificate. ``proofs`` (SymPy) is imported by the CLI only.

Every import counts, also one inside a function: a lazy import still runs one way or the
other. The rules are checked on the real package and, so that the test has teeth, on
small graphs with one wrong edge each.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"closed_forms": 0, "models": 0, "version": 0, "graph": 1, "formats": 2, "capture": 2,
        "bounds": 2, "radii": 3, "certificate": 4, "check": 5, "attacks": 5, "testing": 6,
        "cli": 7}
CHECKER_READS = ("certify.graph", "certify.closed_forms", "certify.certificate.schema",
                 "certify.certificate.compression_document")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "certify").rglob("*.py"))}


def imports(path: Path, modules) -> set[str]:
    """The certify (and proofs) modules ``path`` imports: ``from P import m`` names the
    module ``P.m`` when there is one, otherwise ``P`` itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m.split(".")[0] in ("certify", "proofs")}


def stage(module: str) -> str | None:
    """The stage of a certify module (``None`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "certify" and len(parts) > 1 else None


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the stages, the checker's narrower rule or the
    ``proofs`` rule, as ``"importer -> imported"``."""
    bad = []
    for source, targets in edges.items():
        here = stage(source)
        if here is None:  # certify/__init__.py: the public API may gather from anywhere
            continue
        for target in targets:
            there = stage(target)
            if target.split(".")[0] == "proofs":
                ok = here == "cli"
            elif there is None:
                ok = False  # importing the package's API from inside it runs upwards
            elif here == "check" and there != "check":
                ok = target.startswith(CHECKER_READS)
            else:
                ok = there == here or RANK[there] < RANK[here]
            if not ok:
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def test_every_stage_is_ranked(edges):
    assert {stage(m) for m in edges} - {None} == set(RANK)


def test_imports_run_one_way(edges):
    assert wrong_way(edges) == []


def test_no_modules_import_each_other(edges):
    # A package's __init__ gathers its modules, so a module importing its own package's
    # API (instead of the module that defines the name) closes a loop too.
    assert cycles(edges) == []


@pytest.mark.parametrize("source, target", [
    ("certify.graph.graph", "certify.radii.radius"),  # down the pipeline, against it
    ("certify.formats.loading", "certify.capture.export"),  # two stages of one rank
    ("certify.check.claims", "certify.bounds.linear"),  # the checker reading torch bounds
    ("certify.check.claims", "certify.certificate.document"),
    ("certify.radii.radius", "certify"),  # the public API from inside the package
    ("certify.radii.radius", "proofs"),
])
def test_a_wrong_way_import_is_caught(edges, source, target):
    planted = {**edges, source: edges[source] | {target}}
    assert wrong_way(planted) == [f"{source} -> {target}"]


def test_a_loop_is_caught(edges):
    planted = {**edges, "certify.graph.operators.base": edges["certify.graph.operators.base"]
               | {"certify.graph.operators.enclosure"}}
    assert cycles(planted) == [["certify.graph.operators.base",
                                "certify.graph.operators.enclosure"]]
