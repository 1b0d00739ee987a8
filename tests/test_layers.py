"""Imports point down: the layers of ``mrplip_core`` (ARCHITECTURE.md), checked on the source.

Every module is parsed with ``ast``; every import is an edge: module level or inside a
function, ``import a.b`` and ``from a import b``, relative imports resolved (``from . import
x`` is an edge to the module ``x`` when it is one), and string constants that name a module
of the package (the lazy attribute maps of the ``__init__`` files, ``importlib`` calls).
An edge to a higher layer, or to another package of the same layer, fails with the module,
line and target; so does any import cycle between modules. ``mrplip_core.testing`` may
import any layer; no other module may import it.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import mrplip_core

PACKAGE = "mrplip_core"
ROOT = Path(mrplip_core.__file__).parent

#: Top to bottom. A package may import its own modules and the packages of lower layers only;
#: packages that share a layer do not import each other. "" is the root package (__version__).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),  # python -m mrplip_core
    ("cli",),  # the mrplip command; each stage registers its verbs from its own cli module
    ("report",),  # the HTML report: reads every stage's artifacts
    ("use",),  # using the models: localisation on slides, embeddings (reuses evaluation's embedders)
    ("evaluation",),  # zero-shot, probes, retrieval of frozen encoders and trained runs
    ("train",),  # the pretraining loop; train.summary reads a run folder back
    ("losses",),  # the objective's terms (MR-PLIP's six, PathFLIP's two)
    ("pathflip_model",),  # the PathFLIP model over a slide's patch features (uses model's layers)
    ("data", "model"),  # bags and their LM inputs; the model, its masks, the term names
    ("captions", "features", "convert_llava", "pathflip"),  # per-slide stages, and the LLaVA converter
    ("wsi", "encoders", "serving"),  # slides and tiling; the frozen-encoder registry; LLM server and client
    ("jobs",),  # job units, --settings, shard markers (written with io.atomic)
    ("io", "config_mapping", "config_schema", "lazy", "layout", "lifetime", ""),  # artifact writing, config <-> dataclasses, lazy names, result paths, processes that die with their launcher
)
#: May import anything (test helpers); imported by tests/ and bench/ only.
FREE = "testing"


@dataclass(frozen=True)
class Edge:
    """``module`` imports ``target`` at ``line``."""

    module: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root`` (the folder of ``package``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join((package, *parts))] = path
    return names


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name ``from <level dots><module> import ...`` refers to inside ``importer``."""
    if not level:
        return module or ""
    anchor = importer.split(".") if is_package else importer.split(".")[:-1]
    base = anchor[: len(anchor) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every edge from a module of ``package`` to a module of ``package``."""
    modules = module_files(root, package)
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module, node.level, name, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
                targets = [node.value]
            for target in dict.fromkeys(targets):
                if (target == package or target.startswith(package + ".")) and target != name:
                    edges.append(Edge(name, node.lineno, target))
    return edges


def part(module: str) -> str:
    """The subpackage (or top-level module) a dotted name belongs to; "" for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(edges: Iterable[Edge], layers: Sequence[Sequence[str]], free: str = FREE) -> list[str]:
    """Edges that point up, sideways (same layer, other package) or into ``free`` from outside it."""
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    out = []
    for e in edges:
        src, dst = part(e.module), part(e.target)
        if src == dst or src == free:
            continue
        if dst == free:
            out.append(f"{e}: only tests, bench/ and {free} itself import the test helpers")
        elif src not in rank or dst not in rank:
            unknown = src if src not in rank else dst
            out.append(f"{e}: {unknown!r} has no layer (add it to LAYERS and ARCHITECTURE.md)")
        elif rank[dst] < rank[src]:
            out.append(f"{e}: {dst!r} is a higher layer than {src!r}")
        elif rank[dst] == rank[src]:
            out.append(f"{e}: {dst!r} and {src!r} share a layer and must not import each other")
    return out


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a node importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_graph(edges: Iterable[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.module, set()).add(e.target)
    return graph


def package_graph(edges: Iterable[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        if part(e.module) != part(e.target):
            graph.setdefault(part(e.module), set()).add(part(e.target))
    return graph


EDGES = import_edges(ROOT, PACKAGE)


def _report(problems: Sequence[object]) -> str:
    return f"{len(problems)} import problem(s):\n" + "\n".join(f"  {p}" for p in problems)


# ----------------------------------------------------------------------------- mrplip_core


def test_every_package_has_one_layer() -> None:
    named = [name for layer in LAYERS for name in layer]
    assert len(named) == len(set(named)), "a package is in two layers"
    present = {part(m) for m in module_files(ROOT, PACKAGE)}
    assert present - {FREE} == set(named), "LAYERS and the packages of mrplip_core differ"


def test_imports_point_down() -> None:
    problems = layer_violations(EDGES, LAYERS)
    assert not problems, _report(problems)


def test_no_import_cycles_between_packages_or_modules() -> None:
    loops = cycles(package_graph(EDGES)) + cycles(module_graph(EDGES))
    assert not loops, _report([" -> ".join(c) for c in loops])


@pytest.mark.parametrize("importer, forbidden", [
    ("data", "losses"), ("model", "losses"), ("evaluation", "losses"), ("evaluation", "report"),
    ("evaluation", "cli"), ("captions", "convert_llava"),
])
def test_named_boundaries(importer: str, forbidden: str) -> None:
    crossing = [e for e in EDGES if part(e.module) == importer and part(e.target) == forbidden]
    assert not crossing, _report(crossing)


def test_only_the_test_helpers_import_the_test_helpers() -> None:
    crossing = [e for e in EDGES if part(e.target) == FREE and part(e.module) != FREE]
    assert not crossing, _report(crossing)
    assert any(part(e.module) == FREE for e in EDGES), "the walker found no import in mrplip_core.testing"


def test_the_walker_sees_imports_inside_functions_relative_imports_and_lazy_maps() -> None:
    found = {(e.module, e.target) for e in EDGES}
    # inside a function
    assert ("mrplip_core.cli", "mrplip_core.report.cli") in found
    # the lazy attribute map of an __init__ (a string constant)
    assert ("mrplip_core.evaluation", "mrplip_core.evaluation.embedders") in found
    # from-imports of a module and of names
    assert ("mrplip_core.report.sections", "mrplip_core.train.summary") in found


# ----------------------------------------------------------------------------- the checker itself


def write_tree(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checker_fails_on_upward_sideways_cyclic_and_test_helper_imports(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "pkg", {
        "__init__.py": "",
        "low/__init__.py": 'LAZY = {"thing": "pkg.low.a"}\n',
        "low/a.py": """\
            from . import c

            def late():
                from pkg.high import b  # upward, inside a function
                return b
            """,
        "low/c.py": "from .a import late\n",  # a <-> c
        "low/d.py": "import pkg.testing.helper\n",  # the test helpers from library code
        "side/__init__.py": "from ..low import a\n",  # sideways: side and low share a layer
        "high/__init__.py": "",
        "high/b.py": "import json\n",
        "high/e.py": "from ..low.c import late\nfrom .. import low\n",  # both fine: down
        "testing/__init__.py": "",
        "testing/helper.py": "from pkg.high import b\n",  # fine: testing imports anything
    })
    edges = import_edges(root, "pkg")
    layers = (("high",), ("low", "side"), ("",))

    def where(rel: str, line: int) -> str:
        return f"pkg.{rel}:{line}"

    problems = layer_violations(edges, layers)
    assert len(problems) == 3, problems
    assert any(p.startswith(f"{where('low.a', 4)} imports pkg.high") and "higher layer" in p for p in problems)
    assert any(p.startswith(f"{where('low.d', 1)} imports pkg.testing.helper") for p in problems)
    assert any(p.startswith("pkg.side:1 imports pkg.low.a") and "share a layer" in p for p in problems)
    assert cycles(module_graph(edges)) == [["pkg.low.a", "pkg.low.c"]]
    assert ("pkg.low", "pkg.low.a") in {(e.module, e.target) for e in edges}  # the lazy map
    assert cycles(package_graph(edges)) == [["high", "low", "testing"]]
    # a package missing from the layers is named
    assert any("'side' has no layer" in p for p in layer_violations(edges, (("high",), ("low",), ("",))))
