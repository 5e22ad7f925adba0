"""The layers are folders, and their boundaries hold: the runtime and the service never import torch.

Read from the source (module- and function-level imports; ``if TYPE_CHECKING:`` blocks do not run and are
skipped), so a lazy import inside a function cannot slip past. What each layer may not import:
"""

from __future__ import annotations

import pytest

from scripts.dvc_deps import runtime_imports
from tests.conftest import ROOT

TORCH = ("torch", "torchcrf", "transformers", "dvclive", "accelerate")
FORBIDDEN = {
    "pipeline/core": (*TORCH, "pipeline.labelstudio", "pipeline.runtime", "pipeline.modeling", "pipeline.loop",
                      "pipeline.stages", "pipeline.tuning", "serve"),
    "pipeline/runtime": (*TORCH, "pipeline.labelstudio", "pipeline.modeling", "pipeline.loop", "pipeline.stages",
                         "serve"),
    "pipeline/labelstudio": (*TORCH, "pipeline.runtime", "pipeline.modeling", "pipeline.loop", "pipeline.stages",
                             "serve"),
    # training runs in another process (a DVC experiment's stage)
    "pipeline/loop": (*TORCH, "pipeline.modeling", "pipeline.stages", "pipeline.tuning", "serve"),
    "pipeline/modeling": ("pipeline.labelstudio", "pipeline.loop", "pipeline.stages", "pipeline.tuning", "serve"),
    "pipeline/tuning": (*TORCH, "pipeline.labelstudio", "pipeline.runtime", "pipeline.modeling", "pipeline.stages",
                        "serve"),  # Optuna drives DVC experiments: training runs in their stage processes
    "pipeline/stages": ("serve",),
    "serve": (*TORCH, "pipeline.modeling", "pipeline.stages", "pipeline.tuning"),
}


def violations(folder: str) -> list[str]:
    banned = FORBIDDEN[folder]
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in sorted(runtime_imports(path)):
            if any(module == b or module.startswith(b + ".") for b in banned):
                out.append(f"{path.relative_to(ROOT)} imports {module}")
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_layer_imports_stay_inside_its_boundary(folder):
    assert not violations(folder)


def test_ray_is_imported_only_by_the_ray_engine_and_only_when_it_runs():
    """Ray is an extra (``pip install ".[scale]"``): nothing else may need it, and importing the engine may not."""
    engine = ROOT / "pipeline" / "labelstudio" / "preannotate_ray.py"
    users = sorted(str(p.relative_to(ROOT)) for folder in ("pipeline", "serve") for p in (ROOT / folder).rglob("*.py")
                   if any(m == "ray" or m.startswith("ray.") for m in runtime_imports(p)))
    assert users == [str(engine.relative_to(ROOT))]
    assert not any(m == "ray" or m.startswith("ray.") for m in runtime_imports(engine, top_level_only=True))


def test_every_module_of_the_package_sits_in_a_layer():
    loose = sorted(p.name for p in (ROOT / "pipeline").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules outside a layer folder: {loose}"


def test_the_check_sees_lazy_imports_and_skips_type_checking_blocks(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                      "def f():\n    from pipeline.modeling import model\n")
    assert runtime_imports(source) == {"typing", "typing.TYPE_CHECKING", "pipeline.modeling",
                                       "pipeline.modeling.model"}
    assert runtime_imports(source, top_level_only=True) == {"typing", "typing.TYPE_CHECKING"}
