"""Each DVC stage's code deps: the project files its command imports, read from the source.

    python -m scripts.dvc_deps            # list what each stage's deps lack or hold needlessly
    python -m scripts.dvc_deps --write    # rewrite the code deps of every dvc.yaml to match

The import closure follows module-level and function-level imports alike (a lazy import runs too), starting
at what the stage's ``cmd`` runs: ``python -m pipeline STAGE`` is ``pipeline/__main__.py``'s module-level
imports plus the stage's module; ``python -m scripts.x`` is that script. tests/test_dvc_deps.py fails when a
dvc.yaml and the imports disagree, so `dvc repro` never calls a stale stage up to date.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PACKAGES = ("pipeline", "scripts", "serve")
DVC_FILES = ["dvc.yaml", "pipelines/msra/dvc.yaml", "pipelines/labelstudio/dvc.yaml"]
CODE_DEP = re.compile(r"^(\s+)- ((?:pipeline|scripts|serve)/\S+\.py)$")


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def runtime_imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every module ``path`` imports when it runs, lazy imports in functions included (or, with
    ``top_level_only``, those that run at import time); ``if TYPE_CHECKING:`` blocks never run and are skipped.
    ``from a import b`` yields both ``a`` and ``a.b`` (b may be a module). tests/test_layers.py uses it too.
    """
    found: set[str] = set()

    def walk(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                walk(child)
            return
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            walk(child)

    walk(ast.parse(path.read_text(encoding="utf-8")))
    return found


def imported_modules(path: Path, top_level_only: bool = False) -> set[str]:
    """The project's own modules among :func:`runtime_imports`."""
    return {n for n in runtime_imports(path, top_level_only) if n.split(".")[0] in LOCAL_PACKAGES}


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
    return {path.relative_to(ROOT).as_posix() for path, _ in visited}


def stage_entries(cmd: str) -> list[tuple[str, bool]]:
    from pipeline.__main__ import STAGES

    stage = re.search(r"python -m pipeline(?: --params \S+)? ([\w-]+)", cmd)
    if stage:
        return [("pipeline.__main__", True), (STAGES[stage.group(1)], False)]
    script = re.search(r"python -m (scripts\.\w+)", cmd)
    if script:
        return [(script.group(1), False)]
    raise ValueError(f"unknown stage command {cmd!r}: teach scripts/dvc_deps.py how to read it")


def stages(dvc_file: str) -> dict[str, dict]:
    return yaml.safe_load((ROOT / dvc_file).read_text(encoding="utf-8"))["stages"]


def needed_deps(stage: dict) -> list[str]:
    cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
    return sorted(closure(stage_entries(cmd)))


def rewrite(dvc_file: str) -> bool:
    """Replace each stage's code deps by its import closure, keeping every other line; True if changed."""
    path = ROOT / dvc_file
    text = path.read_text(encoding="utf-8")
    wanted = {name: needed_deps(stage) for name, stage in stages(dvc_file).items()}
    out, current, written = [], None, False
    for line in text.splitlines():
        header = re.match(r"^  ([\w-]+):$", line)
        if header:
            current, written = header.group(1), False
        code = CODE_DEP.match(line)
        if code and current in wanted:
            if not written:
                out.extend(f"{code.group(1)}- {dep}" for dep in wanted[current])
                written = True
            continue
        out.append(line)
    new = "\n".join(out) + "\n"
    path.write_text(new, encoding="utf-8")
    return new != text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the dvc.yaml files")
    args = parser.parse_args()
    wrong = 0
    for dvc_file in DVC_FILES:
        if args.write:
            print(f"{dvc_file}: {'rewritten' if rewrite(dvc_file) else 'up to date'}")
            continue
        for name, stage in stages(dvc_file).items():
            declared = {d for d in stage.get("deps", []) if CODE_DEP.match(f"  - {d}")}
            needed = set(needed_deps(stage))
            if declared != needed:
                wrong += 1
                print(f"{dvc_file} {name}: add {sorted(needed - declared)}, remove {sorted(declared - needed)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
