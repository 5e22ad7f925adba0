"""Predictions pushed into a real Label Studio server read back exactly as sent."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import yaml

from pipeline.core.config import PushConfig
from pipeline.core.errors import LabelConfigMismatch
from pipeline.labelstudio.client import LabelStudioClient
from pipeline.labelstudio.labelconfig import read_label_config
from pipeline.labelstudio.push import push
from pipeline.labelstudio.regions import to_ls_prediction
from pipeline.labelstudio.shards import Predictions, ShardWriter
from pipeline.runtime.inference import Entity, TextPrediction
from tests.conftest import ROOT, run

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]

CONFIG_XML = (ROOT / "data" / "labelstudio" / "label_config.xml").read_text(encoding="utf-8")


def hand_made_tasks(model_version: str) -> list[dict]:
    """Predictions on hard texts (CJK, emoji, ZWJ) with known offsets, through our own formatter."""
    config = read_label_config(ROOT / "data" / "labelstudio" / "label_config.xml")
    cases = [("我爱北京天安门", [("北京", "geo-loc"), ("天安门", "facility")]),
             ("😀👨‍👩‍👧 Barack Obama in 東京", [("Barack Obama", "person"), ("東京", "geo-loc")]),
             ("CRLF\r\nApple Inc.\r\n", [("Apple Inc.", "company")])]
    tasks = []
    for text, spans in cases:
        entities = [Entity(text.index(sub), text.index(sub) + len(sub), sub, label, 0.5 + 0.1 * i)
                    for i, (sub, label) in enumerate(spans)]
        tasks.append({"data": {"text": text},
                      "predictions": [to_ls_prediction(TextPrediction(entities, 0.42), config, model_version)]})
    return tasks


def regions(prediction: dict) -> list[tuple]:
    return sorted((r["value"]["start"], r["value"]["end"], r["value"]["text"], tuple(r["value"]["labels"]),
                   round(r["score"], 6), r["from_name"], r["to_name"]) for r in prediction["result"])


def test_push_round_trip_is_exact_and_idempotent(label_studio, pipeline_run):
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    predicted = list(Predictions(pipeline_run.path("predictions")))
    tasks = predicted + hand_made_tasks(predicted[0]["predictions"][0]["model_version"])
    project = client.create_project("round trip", CONFIG_XML)
    # the project's tasks get their own ids: push finds them by text
    client.import_tasks(project, [{"data": t["data"]} for t in tasks])

    summary = push(client, project, tasks, PushConfig(match="text"))
    assert (summary.matched, summary.created, summary.failed) == (len(tasks), len(tasks), [])

    stored = {t["data"]["text"]: t for t in client.iter_tasks(project)}
    for task in tasks:
        # what the labeling UI receives for this task: its `predictions` field
        [got] = stored[task["data"]["text"]]["predictions"]
        [sent] = task["predictions"]
        assert got["model_version"] == sent["model_version"]
        assert got["score"] == pytest.approx(sent["score"])
        assert regions(got) == regions(sent)
        for r in got["result"]:
            assert task["data"]["text"][r["value"]["start"]:r["value"]["end"]] == r["value"]["text"]
    assert sum(len(t["predictions"][0]["result"]) for t in tasks) > 0

    again = push(client, project, tasks, PushConfig(match="text"))
    assert (again.created, again.skipped_existing) == (0, len(tasks))
    assert len(client.list_predictions(project_id=project)) == len(tasks)


def test_label_config_mismatch_sends_nothing(label_studio, pipeline_run):
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    tasks = hand_made_tasks("v-mismatch")
    narrow = CONFIG_XML.replace('    <Label value="facility"/>\n', "").replace('    <Label value="company"/>\n', "")
    project = client.create_project("mismatch", narrow)
    client.import_tasks(project, [{"data": t["data"]} for t in tasks])
    with pytest.raises(LabelConfigMismatch, match="'facility'.*x1.*|'company'"):
        push(client, project, tasks)
    assert client.list_predictions(project_id=project) == []


def test_cli_push_takes_the_server_from_the_environment(label_studio, pipeline_run):
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    predicted = list(Predictions(pipeline_run.path("predictions")))
    project = client.create_project("cli push", CONFIG_XML)
    client.import_tasks(project, [{"data": t["data"]} for t in predicted])
    env = dict(pipeline_run.env, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "push", "--project", str(project)],
                          cwd=pipeline_run.root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(predicted)} predictions created" in proc.stderr
    assert label_studio.api_key not in proc.stdout + proc.stderr
    assert len(client.list_predictions(project_id=project)) == len(predicted)

    missing = dict(pipeline_run.env)
    missing.pop("LABEL_STUDIO_API_KEY", None)
    missing.pop("LABEL_STUDIO_URL", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "push", "--project", str(project)],
                          cwd=pipeline_run.root, env=missing, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "LABEL_STUDIO_URL" in proc.stderr and "Traceback" not in proc.stderr


def test_dvc_push_stage(label_studio, pipeline_run, tmp_path):
    """`dvc repro pipelines/labelstudio/dvc.yaml`, as the README says, with the server from the environment."""
    root = tmp_path / "project"
    shutil.copytree(pipeline_run.root, root, symlinks=True)
    (root / "pipelines" / "labelstudio").mkdir(parents=True)
    shutil.copy2(ROOT / "pipelines" / "labelstudio" / "dvc.yaml", root / "pipelines" / "labelstudio")
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    predicted = list(Predictions(pipeline_run.path("predictions")))
    project = client.create_project("dvc push", CONFIG_XML)
    client.import_tasks(project, [{"data": t["data"]} for t in predicted])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["push"]["project"] = project
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(pipeline_run.env, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key)

    proc = run(["dvc", "repro", "pipelines/labelstudio/dvc.yaml"], root, env)

    assert "Running stage 'pipelines/labelstudio/dvc.yaml:push'" in proc.stdout
    assert len(client.list_predictions(project_id=project)) == len(predicted)
    lock = (root / "pipelines" / "labelstudio" / "dvc.lock").read_text()
    assert label_studio.api_key not in proc.stdout + proc.stderr + lock + (root / "params.yaml").read_text()


def many_tasks(n: int, version: str) -> list[dict]:
    config = read_label_config(ROOT / "data" / "labelstudio" / "label_config.xml")
    tasks = []
    for i in range(n):
        text = f"Task {i}: Barack Obama visited 北京 😀"
        start = text.index("Barack Obama")
        entities = [Entity(start, start + 12, "Barack Obama", "person", 0.9)]
        tasks.append({"id": i + 1, "data": {"text": text},
                      "predictions": [to_ls_prediction(TextPrediction(entities, 0.8), config, version)]})
    return tasks


def test_label_map_renames_model_labels_to_the_projects(label_studio):
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    tasks = hand_made_tasks("v-map")
    renamed = CONFIG_XML.replace('value="geo-loc"', 'value="location"')
    project = client.create_project("label map", renamed)
    client.import_tasks(project, [{"data": t["data"]} for t in tasks])
    with pytest.raises(LabelConfigMismatch, match="'geo-loc'"):
        push(client, project, tasks)
    summary = push(client, project, tasks, PushConfig(label_map={"geo-loc": "location"}))
    assert summary.created == len(tasks)
    labels = {r["value"]["labels"][0] for p in client.list_predictions(project_id=project) for r in p["result"]}
    assert "location" in labels and "geo-loc" not in labels


def test_import_mode_creates_tasks_with_predictions_once(label_studio):
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    tasks = many_tasks(120, "v-import")
    project = client.create_project("import mode", CONFIG_XML)
    first = push(client, project, tasks, PushConfig(mode="import", batch_size=50))
    assert first.created == 120
    again = push(client, project, tasks, PushConfig(mode="import", batch_size=50))
    assert (again.created, again.skipped_existing) == (0, 120)
    stored = list(client.iter_tasks(project))
    assert len(stored) == 120
    assert all(len(t["predictions"]) == 1 for t in stored)


#: Predictions of the restart test: ``NER_PUSH_TASKS=20000`` is the issue's size (see the test's docstring).
PUSH_TASKS = int(os.environ.get("NER_PUSH_TASKS", "3000"))
#: Predictions per request: about 100 requests at any size (30 at the default 3,000, many batches to interrupt),
#: never under 20; Label Studio's cost per import request grows with the project (20k at 20 per request, 1,000
#: requests, outran a 900 s limit).
PUSH_BATCH = max(20, PUSH_TASKS // 100)


def test_push_interrupted_by_a_server_stop_resumes_to_exactly_once(label_studio, tmp_path):
    """Stop Label Studio in the middle of a push from a predictions folder (shards of 500, read as a stream),
    start it again, push again: each prediction once. 3,000 by default; ``NER_PUSH_TASKS=20000`` is the issue's
    size (push's first task listing alone took over 5 minutes at 20k with ``fields=all``: README)."""
    import time

    import yaml

    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    version = "v-restart"
    tasks = many_tasks(PUSH_TASKS, version)
    project = client.create_project("restart", CONFIG_XML)
    client.import_tasks(project, [{"data": t["data"]} for t in tasks])
    with ShardWriter(tmp_path / "data" / "predictions", {}, shard_size=500) as shards:
        for task in tasks:
            shards.add(task)
        shards.finish({"model_version": version})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(predictions="data/predictions", push_state="state/push.jsonl")
    params["push"].update(project=project, retries=2, backoff=0.2, batch_size=PUSH_BATCH)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key)

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "push"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not client.list_predictions(project_id=project):  # stop as soon as the first batch is in
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    label_studio.stop()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "run push again" in stderr and "Traceback" not in stderr
    label_studio.start()
    done_before = len(client.list_predictions(project_id=project))
    assert 0 < done_before < PUSH_TASKS
    state = tmp_path / "state" / "push.jsonl"
    # the record may trail the server (a batch can land just as the connection drops); never lead it
    recorded = state.read_text().splitlines() if state.exists() else []
    assert len(recorded) <= done_before

    again = subprocess.run([sys.executable, "-m", "pipeline", "push"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900 * max(1, PUSH_TASKS // 3000))
    assert again.returncode == 0, again.stderr
    predictions = client.list_predictions(project_id=project)
    per_task = Counter(p["task"] for p in predictions if p["model_version"] == version)
    assert len(per_task) == PUSH_TASKS and set(per_task.values()) == {1}
    assert label_studio.api_key not in again.stdout + again.stderr + "\n".join(recorded)


def test_tasks_with_the_same_text_each_get_their_prediction_in_both_modes(label_studio):
    client = LabelStudioClient(label_studio.url, label_studio.api_key)
    tasks = many_tasks(6, "v-dup")
    tasks[3] = {**tasks[0], "id": 4}  # the file holds one text twice: both tasks are real tasks
    texts = [t["data"]["text"] for t in tasks]

    project = client.create_project("same text, attach", CONFIG_XML)
    client.import_tasks(project, [{"data": t["data"]} for t in tasks])
    summary = push(client, project, tasks, PushConfig(batch_size=2))
    stored = list(client.iter_tasks(project))
    assert all(len(t["predictions"]) == 1 for t in stored)
    assert (summary.matched, summary.created, summary.skipped_existing, summary.duplicates) == (6, 6, 0, 1)
    again = push(client, project, tasks, PushConfig(batch_size=2))
    assert (again.created, again.skipped_existing, again.duplicates) == (0, 6, 1)

    project = client.create_project("same text, import", CONFIG_XML)
    # the copies land in different batches
    first = push(client, project, tasks, PushConfig(mode="import", batch_size=2))
    stored = list(client.iter_tasks(project))
    assert sorted(t["data"]["text"] for t in stored) == sorted(texts)
    assert all(len(t["predictions"]) == 1 for t in stored)
    assert (first.created, first.skipped_existing) == (6, 0)
    again = push(client, project, tasks, PushConfig(mode="import", batch_size=2))
    assert (again.created, again.skipped_existing) == (0, 6)
    assert len(list(client.iter_tasks(project))) == 6


def _push_cli(tmp_path, env: dict) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(predictions="tasks.json", push_state="push.jsonl")
    params["push"].update(project=1, retries=3, backoff=0.2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "tasks.json").write_text(json.dumps(many_tasks(2, "v-cli")), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "pipeline", "push"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_refused_key_and_a_url_without_a_scheme_are_said_once_not_retried(label_studio, tmp_path):
    wrong_key = dict(os.environ, LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY="0" * 40)
    proc = _push_cli(tmp_path, wrong_key)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "HTTP 401" in proc.stderr and "LABEL_STUDIO_API_KEY" in proc.stderr
    assert "retrying" not in proc.stderr and "run push again" not in proc.stderr

    no_scheme = dict(os.environ, LABEL_STUDIO_URL=label_studio.url.split("://", 1)[1],
                     LABEL_STUDIO_API_KEY=label_studio.api_key)
    proc = _push_cli(tmp_path, no_scheme)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is not an http:// or https:// URL" in proc.stderr
    assert "retrying" not in proc.stderr and "run push again" not in proc.stderr
