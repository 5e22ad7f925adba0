"""Streaming predict (issue 20): shards equal the in-memory result, resume after kill -9, shard boundaries.

The model is a tiny random BERT-BiLSTM-CRF exported to ONNX here (seconds), so thousands of tasks predict in
seconds; the export is the sample's texts cycled with new ids. ``NER_STREAM_TASKS`` sets the size of the
equivalence test: 5,000 by default (~10 s); ``NER_STREAM_TASKS=50000`` runs the issue's size, which took 76 s
on 2 shared cores (30 s streaming, the rest the in-memory reference), over the minute a CI test may take.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.labelstudio.labelconfig import read_label_config
from pipeline.labelstudio.preannotate import predict_export, predict_tasks, select_tasks
from pipeline.labelstudio.shards import MANIFEST, Predictions, shard_name, work_dir
from pipeline.labelstudio.tasks import iter_export
from tests.conftest import ROOT

SAMPLE = ROOT / "data" / "labelstudio" / "export.json"
SAMPLE_CONFIG = ROOT / "data" / "labelstudio" / "label_config.xml"
STREAM_TASKS = int(os.environ.get("NER_STREAM_TASKS", "5000"))


@pytest.fixture(scope="module")
def tiny_onnx(tiny_encoder, tmp_path_factory) -> Path:
    """An exported model folder of a random tiny BERT-BiLSTM-CRF (scaled so that it does predict entities)."""
    import torch

    from pipeline.modeling.export import crf_dict, export_onnx
    from pipeline.modeling.model import HeadConfig, build_model

    out = tmp_path_factory.mktemp("tiny-onnx")
    types = list(read_label_config(SAMPLE_CONFIG).labels)
    tags = ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]
    torch.manual_seed(0)
    model = build_model(tiny_encoder, HeadConfig(num_tags=len(tags), lstm_hidden=16, max_length=64)).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(8.0)
        model.classifier.bias[0] += 2.0  # mostly O, some entities
    export_onnx(model, out / "model.onnx", opset=17)
    (out / "crf.json").write_text(json.dumps(crf_dict(model, tags)))
    (out / "model_info.json").write_text(json.dumps({
        "model_version": "tiny-random", "entity_types": types, "scheme": "BIO", "max_length": 64,
        "window_overlap": 0.5, "encoder_layers": 2, "hidden_size": 32}))
    shutil.copy2(tiny_encoder / "tokenizer.json", out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def runtime(tiny_onnx):
    from pipeline.runtime.inference import NerRuntime

    return NerRuntime(tiny_onnx, threads=1)


@pytest.fixture(scope="module")
def config():
    return read_label_config(SAMPLE_CONFIG)


def cycled_export(path: Path, n: int, labeled_every: int = 0, jsonl: bool = False) -> Path:
    """``n`` tasks: the sample's texts cycled with new ids; every ``labeled_every``-th one keeps an annotation."""
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))
    labeled = next(t for t in sample if t["annotations"])
    with path.open("w", encoding="utf-8") as fh:
        if not jsonl:
            fh.write("[\n")
        for i in range(n):
            task = {"id": 100000 + i, "data": {"text": sample[i % len(sample)]["data"]["text"]}, "annotations": []}
            if labeled_every and i % labeled_every == 0:
                task["annotations"] = labeled["annotations"]
            line = json.dumps(task, ensure_ascii=False)
            fh.write(line + "\n" if jsonl else ("" if i == 0 else ",\n") + line)
        if not jsonl:
            fh.write("\n]\n")
    return path


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_stream_equals_the_in_memory_result_task_for_task(runtime, config, tmp_path):
    export = cycled_export(tmp_path / "big.json", STREAM_TASKS, labeled_every=7)
    started = time.monotonic()
    manifest = predict_export(runtime, export, tmp_path / "pred", config, shard_size=1000, progress=False)
    took = time.monotonic() - started
    expected = predict_tasks(runtime, list(select_tasks(iter_export(export), "unlabeled")), config)
    got = list(Predictions(tmp_path / "pred"))
    assert len(got) == len(expected) == STREAM_TASKS - len(range(0, STREAM_TASKS, 7))
    for mine, theirs in zip(got, expected):
        assert mine == theirs
    assert manifest["tasks"] == len(expected) and manifest["input"]["tasks"] == STREAM_TASKS
    assert manifest["entities"] == sum(len(t["predictions"][0]["result"]) for t in expected) > 0
    assert [s["tasks"] for s in manifest["shards"]] == [1000] * (len(expected) // 1000) + (
        [len(expected) % 1000] if len(expected) % 1000 else [])
    for shard in manifest["shards"]:  # each shard is a Label Studio import file on its own
        tasks = json.loads((tmp_path / "pred" / shard["file"]).read_text(encoding="utf-8"))
        assert len(tasks) == shard["tasks"] and all(set(t) == {"id", "data", "predictions"} for t in tasks)
    assert not work_dir(tmp_path / "pred").exists()
    print(f"{STREAM_TASKS} tasks streamed in {took:.1f} s")


@pytest.mark.parametrize("n", [0, 1, 99, 100, 101, 200, 201])
def test_shard_boundaries(runtime, config, tmp_path, n):
    export = cycled_export(tmp_path / "tasks.json", n)
    manifest = predict_export(runtime, export, tmp_path / "pred", config, shard_size=100, chunk=64, progress=False)
    sizes = [s["tasks"] for s in manifest["shards"]]
    assert sizes == [100] * (n // 100) + ([n % 100] if n % 100 else [])
    names = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert names == sorted([MANIFEST] + [shard_name(i) for i in range(len(sizes))])
    assert [t["id"] for t in Predictions(tmp_path / "pred")] == [100000 + i for i in range(n)]


def test_json_lines_input_gives_the_same_shards(runtime, config, tmp_path):
    as_json = cycled_export(tmp_path / "tasks.json", 300, labeled_every=5)
    as_jsonl = cycled_export(tmp_path / "tasks.jsonl", 300, labeled_every=5, jsonl=True)
    one = predict_export(runtime, as_json, tmp_path / "a", config, shard_size=128, progress=False)
    two = predict_export(runtime, as_jsonl, tmp_path / "b", config, shard_size=128, progress=False)
    assert one["shards"] == two["shards"] and one["tasks"] == 240
    assert {k: v for k, v in folder_bytes(tmp_path / "a").items() if k != MANIFEST} == \
        {k: v for k, v in folder_bytes(tmp_path / "b").items() if k != MANIFEST}
    assert list(Predictions(tmp_path / "a")) == list(Predictions(tmp_path / "b"))


def test_resume_keeps_finished_shards_and_a_changed_input_or_model_starts_over(runtime, config, tmp_path,
                                                                            monkeypatch):
    export = cycled_export(tmp_path / "tasks.json", 500)
    predict_export(runtime, export, tmp_path / "whole", config, shard_size=100, chunk=64, progress=False)
    want = folder_bytes(tmp_path / "whole")

    calls = []
    real = runtime.predict

    def failing(texts):  # dies inside the fourth shard, as Ctrl-C would
        calls.append(len(texts))
        if sum(calls) > 350:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(runtime, "predict", failing)
    with pytest.raises(KeyboardInterrupt):
        predict_export(runtime, export, tmp_path / "pred", config, shard_size=100, chunk=64, progress=False)
    partial = work_dir(tmp_path / "pred")
    assert sorted(p.name for p in partial.iterdir()) == ["part-00000.json", "part-00001.json", "part-00002.json",
                                                          "progress.json"]
    assert not (tmp_path / "pred").exists()

    monkeypatch.setattr(runtime, "predict", lambda texts: calls.append(len(texts)) or real(texts))
    calls.clear()
    predict_export(runtime, export, tmp_path / "pred", config, shard_size=100, chunk=64, progress=False)
    assert sum(calls) == 500 - 256  # from the batch holding task 300 (batches at multiples of 64) to the end
    assert folder_bytes(tmp_path / "pred") == want and not partial.exists()

    # an interrupted run of another model version: its shards are not reused
    monkeypatch.setattr(runtime, "predict", failing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        predict_export(runtime, export, tmp_path / "other", config, shard_size=100, chunk=64, progress=False,
                       model_version="v-other")
    monkeypatch.setattr(runtime, "predict", lambda texts: calls.append(len(texts)) or real(texts))
    calls.clear()
    predict_export(runtime, export, tmp_path / "other", config, shard_size=100, chunk=64, progress=False)
    assert sum(calls) == 500 and folder_bytes(tmp_path / "other") == want
    # a changed input: the same
    monkeypatch.setattr(runtime, "predict", failing)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        predict_export(runtime, export, tmp_path / "third", config, shard_size=100, chunk=64, progress=False)
    export.write_text(export.read_text(encoding="utf-8").replace("100000", "99999", 1), encoding="utf-8")
    monkeypatch.setattr(runtime, "predict", lambda texts: calls.append(len(texts)) or real(texts))
    calls.clear()
    manifest = predict_export(runtime, export, tmp_path / "third", config, shard_size=100, chunk=64,
                              progress=False)
    assert sum(calls) == 500 and next(iter(Predictions(tmp_path / "third")))["id"] == 99999
    assert manifest["input"]["sha256"] != json.loads(want[MANIFEST])["input"]["sha256"]


def test_output_must_be_a_folder_of_predictions(runtime, config, tmp_path):
    export = cycled_export(tmp_path / "tasks.json", 3)
    with pytest.raises(PipelineError, match="not one file"):
        predict_export(runtime, export, tmp_path / "out.json", config, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PipelineError, match="new or empty"):
        predict_export(runtime, export, tmp_path / "mine", config, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    legacy = tmp_path / "predictions"  # the single-file layout's folder is taken over
    legacy.mkdir()
    (legacy / "tasks.json").write_text("[]")
    predict_export(runtime, export, legacy, config, progress=False)
    assert sorted(p.name for p in legacy.iterdir()) == [MANIFEST, "part-00000.json"]


def test_a_changed_shard_is_refused_by_the_reader(runtime, config, tmp_path):
    export = cycled_export(tmp_path / "tasks.json", 5)
    predict_export(runtime, export, tmp_path / "pred", config, progress=False)
    shard = tmp_path / "pred" / "part-00000.json"
    shard.write_text(shard.read_text().replace("100000", "100001", 1))
    with pytest.raises(PipelineError, match="sha256"):
        list(Predictions(tmp_path / "pred"))
    (tmp_path / "pred" / MANIFEST).unlink()
    with pytest.raises(PipelineError, match="not a finished predict output"):
        Predictions(tmp_path / "pred")


def recorded_shards(partial: Path) -> int:
    try:
        return len(json.loads((partial / "progress.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0  # not there yet, or caught between write and rename


def test_kill_9_mid_run_then_rerun_gives_identical_shards(tiny_onnx, tmp_path):
    export = cycled_export(tmp_path / "big.json", 5000)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["predict"].update(shard_size=500, threads=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "pipeline", "--params", str(tmp_path / "params.yaml"), "predict",
           "--model", str(tiny_onnx), "--tasks", str(export), "--label-config", str(SAMPLE_CONFIG)]

    def predict(out: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([*cmd, "--out", str(tmp_path / out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, **kw)

    whole = predict("whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    want = folder_bytes(tmp_path / "whole")
    assert len(want) == 11  # 10 shards and the manifest

    killed = predict("pred", start_new_session=True)
    partial = work_dir(tmp_path / "pred")
    deadline = time.monotonic() + 300
    while not recorded_shards(partial):  # the record, not the file: a shard counts once progress.json lists it
        assert killed.poll() is None, killed.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "pred").exists()  # nothing in place until the run finishes
    finished = {p.name for p in partial.glob("part-*.json")}
    assert finished and len(finished) < 10, "killed too late to test a resume"

    again = predict("pred")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming after" in err
    assert folder_bytes(tmp_path / "pred") == want
    assert not partial.exists()
