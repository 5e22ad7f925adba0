"""The main job, for real: `dvc repro` runs every stage and a second run does nothing."""

import json

import pytest

from pipeline.labelstudio.shards import Predictions
from tests.conftest import SPECIAL_TEXTS, run

pytestmark = pytest.mark.slow


def test_repro_runs_every_stage_and_writes_the_promised_outputs(pipeline_run):
    for stage in ("convert", "train", "evaluate", "export", "predict"):
        assert f"Running stage '{stage}'" in pipeline_run.first_stdout
    metrics = json.loads(pipeline_run.path("eval_metrics").read_text())
    assert set(metrics["test"]) >= {"f1", "precision", "recall", "strict_f1", "per_type"}
    assert 0.0 <= metrics["test"]["f1"] <= 1.0
    assert (pipeline_run.path("onnx_dir") / "model.onnx").is_file()
    assert (pipeline_run.path("onnx_dir") / "model.int8.onnx").is_file()
    assert (pipeline_run.path("predictions") / "manifest.json").is_file()  # and its shards
    assert (pipeline_run.path("train_live") / "metrics.json").is_file()
    confusion = json.loads(pipeline_run.path("eval_confusion_plot").read_text())
    assert confusion and set(confusion[0]) == {"actual", "predicted"}
    errors = [json.loads(line) for line in pipeline_run.path("eval_errors").read_text().splitlines()]
    assert all(e["task_id"] and e["kind"] in {"missed", "spurious", "type", "boundary"} for e in errors)


def test_second_repro_does_nothing(pipeline_run):
    proc = run(["dvc", "repro"], pipeline_run.root, pipeline_run.env)
    assert "Running stage" not in proc.stdout
    status = run(["dvc", "status"], pipeline_run.root, pipeline_run.env)
    assert "up to date" in status.stdout


def test_export_is_checked_against_pytorch(pipeline_run):
    metrics = json.loads(pipeline_run.path("export_metrics").read_text())
    assert metrics["parity"]["max_abs_diff"] < 1e-4
    assert metrics["parity"]["mismatched_sequences"] == 0
    assert metrics["parity"]["sequences"] > 0
    # the int8 F1 change is recorded twice, on test and on dev: either alone moves by a point on small sets
    assert metrics["int8_f1_delta"] == metrics["test_f1_int8"] - metrics["test_f1_fp32"]
    assert isinstance(metrics["int8_f1_delta_dev"], float)


def test_saved_model_folder_is_self_contained(pipeline_run, tmp_path):
    import shutil

    from pipeline.core.conll import read_conll
    from pipeline.modeling.evaluate import evaluate

    moved = tmp_path / "model"
    shutil.copytree(pipeline_run.path("model_dir"), moved)
    sentences = list(read_conll(pipeline_run.path("conll_dir") / "test.conll"))
    # loads and predicts from the copy alone (encoder config, weights, tokenizer, labels inside)
    again = evaluate(moved, sentences)
    reported = json.loads(pipeline_run.path("eval_metrics").read_text())["test"]
    assert again["f1"] == pytest.approx(reported["f1"])


def test_predictions_are_label_studio_tasks_with_exact_offsets(pipeline_run):
    tasks = list(Predictions(pipeline_run.path("predictions")))  # the shards, in order
    export = json.loads(pipeline_run.path("export").read_text(encoding="utf-8"))
    unlabeled = {t["id"] for t in export if not t["annotations"]}
    assert {t["id"] for t in tasks} == unlabeled
    texts = {t["data"]["text"] for t in tasks}
    assert set(SPECIAL_TEXTS) <= texts
    version = json.loads((pipeline_run.path("onnx_dir") / "model_info.json").read_text())["model_version"]
    for task in tasks:
        [pred] = task["predictions"]
        assert pred["model_version"] == version
        assert 0.0 <= pred["score"] <= 1.0
        for region in pred["result"]:
            assert (region["from_name"], region["to_name"], region["type"]) == ("label", "text", "labels")
            value = region["value"]
            assert task["data"]["text"][value["start"]:value["end"]] == value["text"]
            assert 0.0 <= region["score"] <= 1.0
