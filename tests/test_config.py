"""Each stage's params section is typed once (pipeline/core/config.py), validated with errors naming section.key."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from pipeline.__main__ import STAGES
from pipeline.core.config import (
    ConvertConfig,
    EvaluateConfig,
    ExportConfig,
    LoopConfig,
    PredictConfig,
    PushConfig,
)
from pipeline.core.errors import ParamsError
from pipeline.modeling.train import TrainConfig
from tests.conftest import ROOT

MODELS = [ConvertConfig, EvaluateConfig, ExportConfig, PredictConfig, PushConfig, LoopConfig]
PARAMS_FILES = [ROOT / "params.yaml", ROOT / "pipelines" / "msra" / "params.yaml"]


@pytest.mark.parametrize("path", PARAMS_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_of_the_params_files_validates_and_shows_every_key(path):
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for model in MODELS:
        model.from_params(params)
        # params.yaml shows every value (DVC tracks the section): no key only the model knows
        assert set(params[model.section]) == set(model.model_fields), model.section
    TrainConfig.from_params(params["train"])


@pytest.mark.parametrize("section,key,value,message", [
    ("convert", "overlap", "shortest", "convert.overlap: Input should be 'longest' or 'error' (got 'shortest')"),
    ("convert", "split", {"key": "text", "dev": 2}, "convert.split.dev: Input should be less than or equal to 1"),
    ("convert", "split", {"key": "id"}, "convert.split.key: Input should be 'text' or 'task_id' (got 'id')"),
    ("convert", "scheme", "BILOU", "convert.scheme: Input should be 'BIO' or 'BIOES' (got 'BILOU')"),
    ("convert", "unknown_label", "drop", "convert.unknown_label: Input should be 'error' or 'ignore'"),
    ("convert", "bad_tasks", "ignore", "convert.bad_tasks: Input should be 'error' or 'skip'"),
    ("convert", "annotations", "latest", "convert.annotations: Input should be 'ground_truth_or_latest' or 'all'"),
    ("export", "quantise", True, "export.quantise: Extra inputs are not permitted"),
    ("predict", "batch_size", 0, "predict.batch_size: Input should be greater than 0"),
    ("push", "mode", "replace", "push.mode: Input should be 'attach' or 'import'"),
    ("evaluate", "batch_size", "many", "evaluate.batch_size: Input should be a valid integer"),
    ("predict", "uncertainty", "margin", "predict.uncertainty: Input should be 'sequence', 'min_entity' or 'entropy'"),
    ("loop", "nice", 20, "loop.nice: Input should be less than or equal to 19"),
])
def test_a_wrong_key_type_or_value_names_section_and_key(section, key, value, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params[section][key] = value
    [model] = [m for m in MODELS if m.section == section]
    with pytest.raises(ParamsError) as err:
        model.from_params(params)
    assert message in str(err.value)


def test_numbers_typed_on_the_command_line_are_coerced():
    # `dvc exp run -S export.int8_smooth=5e-1`: YAML reads 5e-1 (no dot) as a string
    params = {"export": {"int8_smooth": "5e-1", "threads": "2"}}
    config = ExportConfig.from_params(params)
    assert config.int8_smooth == 0.5 and config.threads == 2 and config.opset == ExportConfig().opset


def test_a_bad_policy_stops_the_stage_in_one_line(tmp_path):
    text = (ROOT / "params.yaml").read_text(encoding="utf-8").replace("  overlap: longest ", "  overlap: shortest ")
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "convert"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "convert.overlap: Input should be 'longest' or 'error'" in proc.stderr


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_reads_another_stages_section(stage):
    source = (ROOT / (STAGES[stage].replace(".", "/") + ".py")).read_text(encoding="utf-8")
    read = set(re.findall(r"""params\[["'](\w+)["']\]""", source))
    assert read <= {"paths", "seed", stage}, f"{stage} reads {sorted(read - {'paths', 'seed', stage})}"
