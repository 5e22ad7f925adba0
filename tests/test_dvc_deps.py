"""Each DVC stage lists exactly the project files its command imports, so `dvc repro` never skips a stale stage.

The import closure is read from the source (``ast``: module-level and function-level imports alike, since a
lazy import runs too), starting at what the stage's ``cmd`` runs: ``python -m pipeline STAGE`` is
``pipeline/__main__.py``'s module-level imports plus the stage's module; ``python -m scripts.x`` is that
script. A file the closure reaches but ``deps`` lacks means an edit to it would not re-run the stage; a code
dep outside the closure re-runs it for nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import STAGES
from tests.conftest import ROOT

LOCAL_PACKAGES = ("pipeline", "scripts", "serve")
PIPELINES = ["dvc.yaml", "pipelines/msra/dvc.yaml", "pipelines/labelstudio/dvc.yaml"]


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import x`
    return {n for n in names if n.split(".")[0] in LOCAL_PACKAGES}


def closure(entries: list[tuple[str, bool]]) -> set[str]:
    """Repository-relative files reached from ``(module, top_level_only)`` entries, packages' __init__ too."""
    visited: set[tuple[Path, bool]] = set()

    def visit(name: str, top_only: bool = False) -> None:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = module_file(".".join(parts[:i]))
            only_top = top_only and i == len(parts)
            if path is None or (path, only_top) in visited:
                continue
            visited.add((path, only_top))
            for module in imported_modules(path, top_level_only=only_top):
                visit(module)

    for name, top_only in entries:
        visit(name, top_only)
    return {str(path.relative_to(ROOT)) for path, _ in visited}


def stage_entries(cmd: str) -> list[tuple[str, bool]]:
    stage = re.search(r"python -m pipeline(?: --params \S+)? ([\w-]+)", cmd)
    if stage:
        return [("pipeline.__main__", True), (STAGES[stage.group(1)], False)]
    script = re.search(r"python -m (scripts\.\w+)", cmd)
    if script:
        return [(script.group(1), False)]
    raise AssertionError(f"unknown stage command {cmd!r}: teach tests/test_dvc_deps.py how to read it")


def code_stages() -> list[tuple[str, str, dict]]:
    out = []
    for rel in PIPELINES:
        for name, stage in yaml.safe_load((ROOT / rel).read_text())["stages"].items():
            out.append((rel, name, stage))
    return out


@pytest.mark.parametrize(("dvcfile", "name", "stage"), code_stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_are_its_import_closure(dvcfile, name, stage):
    cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
    needed = closure(stage_entries(cmd))
    declared = {d for d in stage["deps"] if d.endswith(".py")}
    missing, extra = sorted(needed - declared), sorted(declared - needed)
    assert not missing and not extra, (f"{dvcfile} stage {name}: add {missing} to deps" if missing else "") + \
        (f"; remove {extra} (not imported)" if extra else "")


def test_the_closure_follows_lazy_and_package_imports():
    files = closure([("pipeline.__main__", True), ("pipeline.predict", False)])
    assert {"pipeline/__init__.py", "pipeline/__main__.py", "pipeline/predict.py", "pipeline/inference.py",
            "pipeline/viterbi.py", "pipeline/errors.py"} <= files
    assert "pipeline/train.py" not in files  # __main__ imports it lazily for the train command only
