"""Push from a predictions folder (issue 20): shards read one at a time, every prediction sent exactly once.

A stand-in client holds the project in memory (tests/test_labelstudio_push.py runs the same push against a
real Label Studio); here what is checked is the streaming: how far the reader has got when the first batch
goes out, the batches, a re-run that sends nothing, the stage reading the folder, and the file it read before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.config import PushConfig
from pipeline.core.errors import LabelConfigMismatch, PipelineError
from pipeline.labelstudio.labelconfig import read_label_config
from pipeline.labelstudio.push import batches, json_bytes, push
from pipeline.labelstudio.shards import Predictions, ShardWriter
from tests.conftest import ROOT

CONFIG = read_label_config(ROOT / "data" / "labelstudio" / "label_config.xml")


class FakeClient:
    url = "http://fake"

    def __init__(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = tasks
        self.predictions: list[dict[str, Any]] = []
        self.requests: list[int] = []
        self.on_send = lambda: None

    def label_config(self, project_id: int):
        return CONFIG

    def iter_tasks(self, project_id: int):
        yield from self.tasks

    iter_task_data = iter_tasks

    def list_predictions(self, *, project_id: int | None = None, task_id: int | None = None):
        return list(self.predictions)

    def import_predictions(self, project_id: int, predictions: list[dict[str, Any]]) -> None:
        self.on_send()
        self.requests.append(len(predictions))
        self.predictions.extend(predictions)

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        self.on_send()
        self.requests.append(len(tasks))
        start = len(self.tasks)
        for i, task in enumerate(tasks):
            self.tasks.append({"id": start + i + 1, "data": task["data"]})
            self.predictions.extend({"task": start + i + 1, **p} for p in task["predictions"])
        return list(range(start + 1, start + len(tasks) + 1))


def predicted(i: int, version: str = "v1") -> dict[str, Any]:
    text = f"Task {i} in Paris"
    region = {"id": "r0-8-13", "from_name": CONFIG.from_name, "to_name": CONFIG.to_name, "type": "labels",
              "value": {"start": 8, "end": 13, "text": "Paris", "labels": ["geo-loc"]}, "score": 0.9}
    return {"id": i, "data": {"text": text}, "predictions": [{"model_version": version, "score": 0.5,
                                                               "result": [region]}]}


def shards_folder(path: Path, n: int, shard_size: int) -> Path:
    with ShardWriter(path, {"test": n}, shard_size) as writer:
        for i in range(n):
            writer.add(predicted(i), 1)
        writer.finish({"model_version": "v1"})
    return path


class CountingPredictions(Predictions):
    """Counts the tasks read so far (the reader holds one shard at a time)."""

    read = 0

    def __iter__(self):
        for task in super().__iter__():
            self.read += 1
            yield task


@pytest.mark.parametrize("match", ["id", "text"])
def test_attach_from_shards_streams_and_sends_each_prediction_once(tmp_path, match):
    folder = shards_folder(tmp_path / "pred", 1050, shard_size=200)
    client = FakeClient([{"id": i, "data": {"text": f"Task {i} in Paris"}} for i in range(1050)])
    tasks = CountingPredictions(folder)
    seen_at_first_send = []
    client.on_send = lambda: seen_at_first_send.append(tasks.read)
    state = tmp_path / "push_state.jsonl"
    summary = push(client, 1, tasks, PushConfig(match=match, batch_size=100), state_path=state)
    assert summary.created == 1050 and summary.matched == 1050 and not summary.failed
    assert client.requests == [100] * 10 + [50]
    # the check pass read all 1050; sending began after at most one shard of the second pass
    assert seen_at_first_send[0] - 1050 <= 200
    assert sorted(p["task"] for p in client.predictions) == list(range(1050))

    again = push(client, 1, Predictions(folder), PushConfig(match=match, batch_size=100), state_path=state)
    assert again.created == 0 and again.skipped_existing == 1050 and len(client.predictions) == 1050


def test_import_from_shards_creates_each_task_once(tmp_path):
    folder = shards_folder(tmp_path / "pred", 250, shard_size=100)
    client = FakeClient([])
    first = push(client, 1, Predictions(folder), PushConfig(mode="import", batch_size=40))
    again = push(client, 1, Predictions(folder), PushConfig(mode="import", batch_size=40))
    assert first.created == 250 and again.created == 0 and again.skipped_existing == 250
    assert len(client.tasks) == 250 and len(client.predictions) == 250


def test_a_mismatch_found_in_the_last_shard_sends_nothing(tmp_path):
    folder = tmp_path / "pred"
    with ShardWriter(folder, {}, 100) as writer:
        for i in range(299):
            writer.add(predicted(i), 1)
        bad = predicted(299)
        bad["predictions"][0]["result"][0]["value"]["labels"] = ["planet"]
        writer.add(bad, 1)
        writer.finish({})
    client = FakeClient([{"id": i, "data": {"text": f"Task {i} in Paris"}} for i in range(300)])
    with pytest.raises(LabelConfigMismatch, match="planet"):
        push(client, 1, Predictions(folder), PushConfig(match="id"))
    assert client.predictions == [] and client.requests == []


def test_push_stage_reads_the_folder_or_a_single_file(tmp_path, monkeypatch):
    from pipeline.stages import push as stage

    folder = shards_folder(tmp_path / "pred", 30, shard_size=7)
    single = tmp_path / "tasks.json"
    single.write_text(json.dumps([predicted(i, "v2") for i in range(30)]), encoding="utf-8")
    client = FakeClient([{"id": i, "data": {"text": f"Task {i} in Paris"}} for i in range(30)])
    monkeypatch.setattr(stage.LabelStudioClient, "from_env", classmethod(lambda cls, **kw: client))
    for path in (folder, single):
        stage.main({"paths": {"predictions": str(path), "push_state": str(tmp_path / "state.jsonl")},
                    "push": {"project": 1, "match": "id"}})
    assert sorted((p["task"], p["model_version"]) for p in client.predictions) == \
        sorted([(i, "v1") for i in range(30)] + [(i, "v2") for i in range(30)])

    (folder / "manifest.json").unlink()
    with pytest.raises(PipelineError, match="not a finished predict output"):
        stage.main({"paths": {"predictions": str(folder)}, "push": {"project": 1}})
    with pytest.raises(PipelineError, match="not found"):
        stage.main({"paths": {"predictions": str(tmp_path / "nope")}, "push": {"project": 1}})


def test_requests_stay_under_push_max_request_mb():
    """Label Studio refuses a body over DATA_UPLOAD_MAX_MEMORY_SIZE: push cuts batches by bytes as well as count."""
    tasks = [{"id": i, "data": {"text": "x" * n}} for i, n in enumerate([10, 10, 500, 10, 10, 10])]
    ids = lambda runs: [[t["id"] for t in run] for run in runs]  # noqa: E731
    assert ids(batches(tasks, 3)) == [[0, 1, 2], [3, 4, 5]]
    assert ids(batches(tasks, 3, 600)) == [[0, 1], [2, 3], [4, 5]]
    assert ids(batches(tasks, 3, 100)) == [[0, 1], [2], [3, 4], [5]]  # one task over the limit goes alone
    assert json_bytes({"text": "東京"}) == len('{"text": "\\u6771\\u4eac"}')  # escaped: the most a client sends
    assert PushConfig().max_request_mb == 100
