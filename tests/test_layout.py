"""The layout module is the one definition of result paths: for the library and for rules/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mrplip_core.layout import RETRIEVAL, TEMPLATES, Layout, wildcards_of

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mrplip_core"
#: The first path component of every artifact template (tiles, captions, features, ...).
TOP_FOLDERS = sorted({t.split("/")[0].split(".")[0] for t in TEMPLATES.values()})


def test_library_paths_and_rule_patterns_come_from_one_template(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "res")
    assert layout.tiles("S1") == tmp_path / "res" / "tiles" / "S1.parquet"
    assert layout.image_features("uni", "S1") == tmp_path / "res" / "features" / "uni" / "S1.h5"
    assert layout.retrieval_metrics("run") == tmp_path / "res" / "eval" / "run" / RETRIEVAL / "metrics.json"
    # the Snakemake pattern of the same artifact, with and without fixed wildcards
    rules = Layout()
    assert rules.pattern("image_features") == "results/features/{encoder}/{slide}.h5"
    assert rules.pattern("image_features", encoder="uni") == "results/features/uni/{slide}.h5"
    assert rules.expand("tiles", slide=["a", "b"]) == ["results/tiles/a.parquet", "results/tiles/b.parquet"]
    # every template's pattern, filled, is the library's path
    for name in TEMPLATES:
        values = {w: f"<{w}>" for w in wildcards_of(name)}
        assert rules.pattern(name).format(**values) == str(rules.path(name, **values))


def test_a_missing_wildcard_or_unknown_artifact_is_named() -> None:
    with pytest.raises(KeyError, match=r"'tiles' needs \['slide'\]"):
        Layout().path("tiles")
    with pytest.raises(KeyError, match="no artifact 'tile'"):
        Layout().pattern("tile")


def test_rules_write_no_result_path_by_hand() -> None:
    """`grep -c '"results/' rules/*.smk` is 0: every rule path comes from LAYOUT."""
    for smk in sorted((REPO / "rules").glob("*.smk")) + [REPO / "workflow" / "Snakefile"]:
        text = smk.read_text()
        assert '"results/' not in text and "'results/" not in text, smk.name
        for folder in TOP_FOLDERS:  # e.g. f"results/{...}" or "tiles/{slide}.parquet"
            assert not re.search(rf'["\']{folder}/\{{', text), (smk.name, folder)


def _result_path_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that build a result path: ``x / "tiles"``, ``"results/..."`` or an
    f-string starting a path below a top folder (``f"{r}/captions/{s}.parquet"``)."""
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in TOP_FOLDERS:
                    found.append((node.lineno, f"/ {side.value!r}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value.startswith("results/") and "{" not in node.value and " " not in node.value:
                found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            for part in node.values:
                if isinstance(part, ast.Constant) and re.match(rf"^/({'|'.join(TOP_FOLDERS)})/", str(part.value)):
                    found.append((node.lineno, str(part.value)))
    return sorted(found)  # by line (ast.walk is breadth-first)


def test_no_library_module_outside_the_layout_builds_a_result_path() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py" and path.parent == PACKAGE:
            continue
        for line, what in _result_path_literals(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not offenders, "result paths built by hand (use mrplip_core.layout):\n" + "\n".join(offenders)


def test_the_check_catches_a_hand_built_path() -> None:
    tree = ast.parse('def f(r, s):\n    a = r / "tiles" / f"{s}.parquet"\n    b = f"{r}/captions/{s}.parquet"\n'
                     '    return "results/slides.parquet"\n')
    assert [w for _, w in _result_path_literals(tree)] == ["/ 'tiles'", "/captions/", "results/slides.parquet"]
