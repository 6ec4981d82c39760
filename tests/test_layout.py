"""The tree shows the data path: the hot path (`worker.pipeline`) and the model (`worker.model`)
never import the commands around them (`worker.tools`, `worker.bench`), and every package says
what it holds."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

WORKER = ROOT / "worker"


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function (lazy imports count too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def test_the_hot_path_and_the_model_import_no_tool_and_no_bench() -> None:
    offending = {
        f"{path.relative_to(ROOT)} imports {name}"
        for package in ("pipeline", "model")
        for path in (WORKER / package).rglob("*.py")
        for name in imported(path)
        if name.startswith(("worker.tools", "worker.bench"))
    }
    assert not offending, sorted(offending)


def test_the_model_does_not_reach_into_the_pipeline() -> None:
    offending = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (WORKER / "model").rglob("*.py")
        for name in imported(path)
        if name.startswith("worker.pipeline")
    }
    assert not offending, sorted(offending)


def test_every_package_and_module_says_what_it_holds() -> None:
    silent = [
        str(path.relative_to(ROOT))
        for path in WORKER.rglob("*.py")
        if path.name != "__main__.py"
        and not ast.get_docstring(ast.parse(path.read_text()))
        and (path.name != "__init__.py" or path.parent != WORKER)
    ]
    assert not silent, silent
