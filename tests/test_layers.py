"""The package's layers: every import between stages points down, never up or sideways.

    graph, errors          (the vocabulary: imports no stage)
    capture, analyse       (import only the vocabulary)
    rewrite                (+ analyse)
    run                    (+ capture, analyse, rewrite)
    everything else        (applications: interpret, the CLI, ...: anything)
    kernels/               (fxdecomp_kernels: never imports fxdecomp)

Walks the source with ``ast`` (imports inside functions included), so a violation fails here
before anyone notices a cycle at import time.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fxdecomp"

BOTTOM = {"graph", "errors"}
ALLOWED = {
    "graph": BOTTOM,
    "errors": set(),
    "capture": BOTTOM,
    "analyse": BOTTOM,
    "rewrite": BOTTOM | {"analyse"},
    "run": BOTTOM | {"capture", "analyse", "rewrite"},
}


def stage_of_module(path: Path) -> str:
    """The stage a source file belongs to: its first folder under fxdecomp/ (or its stem)."""
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"


def imported_stages(path: Path) -> list[tuple[int, str]]:
    """(line, stage) for every import of an fxdecomp module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ["fxdecomp", *path.relative_to(PKG).parent.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if node.module or not node.level else [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fxdecomp" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
            elif parts[0] == "fxdecomp":
                out.append((node.lineno, "__init__"))
    return out


def violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        stage = stage_of_module(path)
        if stage not in ALLOWED:
            continue  # applications may import any stage
        for line, target in imported_stages(path):
            if target != stage and target not in ALLOWED[stage]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {stage} imports {target}")
    return bad


def test_stages_import_only_downwards():
    assert violations() == []


def test_kernels_never_import_fxdecomp():
    bad = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            bad += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "fxdecomp"]
    assert bad == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The walker is not vacuous: an analyse module importing rewrite is reported."""
    fake = tmp_path / "fxdecomp"
    (fake / "analyse").mkdir(parents=True)
    (fake / "analyse" / "bad.py").write_text(
        "from ..rewrite.rules import RULES\nimport fxdecomp.run.decomposed\nfrom ..graph import ops\n")
    me = sys.modules[__name__]
    monkeypatch.setattr(me, "PKG", fake)
    monkeypatch.setattr(me, "ROOT", tmp_path)
    assert violations() == ["fxdecomp/analyse/bad.py:1: analyse imports rewrite",
                            "fxdecomp/analyse/bad.py:2: analyse imports run"]
