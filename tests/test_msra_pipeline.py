"""The Chinese pipeline (pipelines/msra/): the main pipeline's stages on MSRA, run for real by `dvc repro`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.labelstudio.shards import Predictions
from tests.conftest import ROOT, run, tool_env

MSRA = ROOT / "pipelines" / "msra"
PARAMS = "pipelines/msra/params.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def keys(tree: object, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return {prefix}
    return {k for name, value in tree.items() for k in keys(value, f"{prefix}{name}.")}


def test_msra_stages_are_the_main_stages_with_their_own_params():
    main, msra = load(ROOT / "dvc.yaml")["stages"], load(MSRA / "dvc.yaml")["stages"]
    assert set(msra) == set(main) | {"encoder"}
    for name, stage in main.items():
        twin = msra[name]
        assert twin["wdir"] == "../.."
        assert twin["cmd"] == stage["cmd"].replace("python -m pipeline ", f"python -m pipeline --params {PARAMS} ")
        assert twin["deps"] == stage["deps"], f"{name}: deps drifted from dvc.yaml"
        assert twin["params"] == [{PARAMS: stage["params"]}], name
        for field in ("outs", "metrics", "plots"):
            assert twin.get(field) == stage.get(field), f"{name}: {field} drifted from dvc.yaml"
    # every knob of params.yaml exists in the Chinese params (a new one must be set for both)
    assert keys(load(ROOT / "params.yaml")) <= keys(load(MSRA / "params.yaml"))


def test_msra_outputs_never_touch_the_main_pipeline_outputs():
    main_paths, msra_paths = load(ROOT / "params.yaml")["paths"], load(MSRA / "params.yaml")["paths"]
    for key, path in msra_paths.items():
        assert path != main_paths[key]
        assert re.search(r"(^|/)msra(/|$)", path), f"paths.{key}={path} is not under an msra folder"


@pytest.mark.slow
def test_msra_pipeline_runs_end_to_end_with_exact_chinese_offsets(tmp_path):
    root, home = tmp_path / "project", tmp_path / "home"
    home.mkdir()
    env = tool_env(home)
    for folder in ("pipeline", "scripts"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "pipelines" / "msra").mkdir(parents=True)
    shutil.copy2(MSRA / "dvc.yaml", root / "pipelines" / "msra" / "dvc.yaml")
    (root / "data" / "msra").mkdir(parents=True)
    shutil.copy2(ROOT / "data" / "msra" / "label_config.xml", root / "data" / "msra")
    tasks = json.loads((ROOT / "data" / "msra" / "export.json").read_text(encoding="utf-8"))
    small = [t for t in tasks if t["annotations"]][:300] + [t for t in tasks if not t["annotations"]][:20]
    (root / "data" / "msra" / "export.json").write_text(json.dumps(small, ensure_ascii=False), encoding="utf-8")
    params = load(MSRA / "params.yaml")
    params["encoder"].update(hidden=32, layers=1, heads=2)
    params["train"].update(epochs=1, batch_size=16, lstm_hidden=32)
    (root / PARAMS).write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (root / ".gitignore").write_text("__pycache__/\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "msra"]):
        run(cmd, root, env)

    proc = run(["dvc", "repro", "pipelines/msra/dvc.yaml"], root, env)

    for stage in ("encoder", "convert", "train", "evaluate", "export", "predict"):
        assert f"Running stage 'pipelines/msra/dvc.yaml:{stage}'" in proc.stdout, proc.stdout[-3000:]
    paths = params["paths"]
    encoder = root / paths["encoder"]
    assert (encoder / "config.json").is_file() and (encoder / "tokenizer.json").is_file()
    assert not list(encoder.glob("*.safetensors")) and not list(encoder.glob("*.bin"))  # built from config
    metrics = json.loads((root / paths["eval_metrics"]).read_text())["test"]
    assert set(metrics["per_type"]) <= {"PER", "LOC", "ORG"} and 0.0 <= metrics["f1"] <= 1.0
    predicted = list(Predictions(root / paths["predictions"]))
    assert {t["id"] for t in predicted} == {t["id"] for t in small if not t["annotations"]}
    regions = [(t["data"]["text"], r["value"]) for t in predicted for r in t["predictions"][0]["result"]]
    for text, value in regions:
        assert text[value["start"]:value["end"]] == value["text"]
        assert value["labels"][0] in {"PER", "LOC", "ORG"}
    # the main pipeline's outputs were never written
    assert not (root / "models" / "best").exists() and not (root / "data" / "conll").exists()
    status = run(["dvc", "status", "pipelines/msra/dvc.yaml"], root, env)
    assert "up to date" in status.stdout
