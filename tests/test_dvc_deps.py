"""Each DVC stage lists exactly the project files its command imports, so `dvc repro` never skips a stale stage.

A file the import closure reaches but ``deps`` lacks means an edit to it would not re-run the stage; a code
dep outside the closure re-runs it for nothing. ``python -m scripts.dvc_deps --write`` fixes both.
"""

from __future__ import annotations

import pytest

from scripts.dvc_deps import CODE_DEP, DVC_FILES, closure, needed_deps, stages


def code_stages() -> list[tuple[str, str, dict]]:
    return [(f, name, stage) for f in DVC_FILES for name, stage in stages(f).items()]


@pytest.mark.parametrize(("dvcfile", "name", "stage"), code_stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_are_its_import_closure(dvcfile, name, stage):
    needed = set(needed_deps(stage))
    declared = {d for d in stage["deps"] if CODE_DEP.match(f"  - {d}")}
    missing, extra = sorted(needed - declared), sorted(declared - needed)
    assert not missing and not extra, (
        f"{dvcfile} stage {name}: add {missing}, remove {extra} (python -m scripts.dvc_deps --write)")


def test_the_closure_follows_lazy_and_package_imports():
    files = closure([("pipeline.__main__", True), ("pipeline.stages.predict", False)])
    assert {"pipeline/__init__.py", "pipeline/__main__.py", "pipeline/stages/__init__.py",
            "pipeline/stages/predict.py", "pipeline/runtime/inference.py", "pipeline/runtime/viterbi.py",
            "pipeline/core/errors.py"} <= files
    assert "pipeline/modeling/train.py" not in files  # __main__ imports it lazily for the train command only
