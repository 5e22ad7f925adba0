"""The labelling loop end to end: a real Label Studio presses *Start Training* on the service, which trains a
candidate as a real DVC experiment (tiny encoder, warm-started from the served weights), gates it against the served model, promotes, swaps and
pushes fresh predictions; a candidate trained on corrupted labels is rejected. Requests keep being answered
throughout.

The data are templated sentences ("Alice visited Paris on Monday .") that the tiny encoder learns within ten
epochs, so the gate has real figures to compare: the sample's tiny model scores 0 on them, a candidate close
to 1, a candidate trained on swapped labels close to 0.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.labelstudio.client import LabelStudioClient
from pipeline.labelstudio.sentences import split_of
from tests.conftest import ROOT, run
from tests.service_process import ServiceProcess

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]
API_KEY = "loop-key-4242"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONFIG_XML = (ROOT / "data" / "labelstudio" / "label_config.xml").read_text(encoding="utf-8")
PEOPLE = ["Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar",
          "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Yvonne", "Zelda"]
PLACES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo",
          "Athens", "Warsaw", "Zurich", "Geneva", "Munich", "Milan", "Porto", "Seville", "Lyon", "Nice"]
TEMPLATES = ["{p} visited {l} on Monday .", "Yesterday {p} flew to {l} .", "{p} lives in {l} now .",
             "We met {p} near {l} station .", "{l} welcomed {p} warmly ."]
SWAP = {"person": "geo-loc", "geo-loc": "person"}


def region(text: str, word: str, label: str) -> dict:
    start = text.index(word)
    return {"from_name": "label", "to_name": "text", "type": "labels",
            "value": {"start": start, "end": start + len(word), "text": word, "labels": [label]}}


def templated_tasks(n: int, seed: int, annotated: bool) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        text = rng.choice(TEMPLATES).format(p=person, l=place)
        task = {"data": {"text": text}}
        if annotated:
            task["annotations"] = [{"result": [region(text, person, "person"), region(text, place, "geo-loc")]}]
        tasks.append(task)
    return tasks


@pytest.fixture(scope="module")
def loop_project(pipeline_run, tmp_path_factory) -> Path:
    """A copy of the test project's DVC workspace (git, DVC cache, exported model) to train in."""
    root = tmp_path_factory.mktemp("loop") / "project"
    shutil.copytree(pipeline_run.root, root, symlinks=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(epochs=10, patience=20)
    params["loop"].update(warm_start=True, warm_epochs=10)  # each candidate starts from the served weights
    # the encoder as a user has it: a git-ignored folder inside the project, which the experiment must bring along
    shutil.copytree(params["paths"]["encoder"], root / "pretrained" / "tiny")
    params["paths"]["encoder"] = "pretrained/tiny"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with (root / ".gitignore").open("a") as fh:
        fh.write("/data/loop/\n/models/checkpoints/\n/models/versions/\n/models/served\n/models/registry.json\n"
                 "/pretrained/\n")
    run(["git", "add", "-A"], root, pipeline_run.env)
    run(["git", "commit", "-qm", "loop settings"], root, pipeline_run.env)
    return root


class Traffic:
    """Requests to /v1/ner in a loop on a thread, counting answers that are not 200."""

    def __init__(self, url: str) -> None:
        self.url, self.sent, self.errors = url, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    response = client.post("/v1/ner", json={"texts": ["Alice visited Paris on Monday ."]})
                    if response.status_code != 200:
                        self.errors.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                self.sent += 1
                time.sleep(0.2)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for_jobs(client: httpx.Client, n: int, timeout: float = 900) -> dict:
    """``/v1/training`` once ``n`` jobs have finished and none runs."""
    deadline = time.monotonic() + timeout
    report: dict = {}
    while time.monotonic() < deadline:
        report = client.get("/v1/training").json()
        if len(report["history"]) >= n and report["current"] is None and not report["pending"]:
            return report
        time.sleep(2)
    raise AssertionError(f"{n} jobs did not finish in {timeout:.0f} s: {json.dumps(report)[:3000]}")


def test_start_training_promotes_a_better_candidate_and_rejects_a_corrupted_one(label_studio, loop_project,
                                                                              tmp_path):
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    project = ls.projects.create(title="loop", label_config=CONFIG_XML)
    unlabeled = templated_tasks(6, seed=2, annotated=False)
    ls.projects.import_tasks(id=project.id, request=templated_tasks(240, seed=1, annotated=True) + unlabeled)
    env = {"NER_API_KEY": API_KEY, "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": label_studio.api_key, "PATH": "/usr/bin:/bin",  # a shell without the venv
           "HOME": str(tmp_path), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "DVC_NO_ANALYTICS": "1"}
    service = ServiceProcess(loop_project / "models" / "onnx", tmp_path / "serve.log", env=env, cwd=loop_project)
    service.env["NER_PUBLIC_URL"] = service.url  # the URL Label Studio is given: its webhook gets our key
    with service as svc, httpx.Client(base_url=svc.url, headers=AUTH, timeout=60) as client:
        first_version = client.get("/v1/model").json()["model_version"]
        ml = ls.ml.create(project=project.id, url=svc.url, title="ner service", is_interactive=False,
                          auth_method="BASIC_AUTH", basic_auth_user="label-studio", basic_auth_pass=API_KEY)
        with Traffic(svc.url) as traffic:
            ls.ml.train(id=ml.id)  # the Start Training button: Label Studio POSTs START_TRAINING to /webhook
            report = wait_for_jobs(client, 1)
            [job] = report["history"]
            assert job["decision"] == "promoted", (job, svc.log_tail())
            assert job["candidate"]["dev_f1"] > 0.5 and job["served"]["dev_f1"] < job["candidate"]["dev_f1"]
            promoted = job["version"]
            assert promoted.startswith(f"loop-{project.id}-") and promoted != first_version
            assert job["warm_from"] == first_version  # the workspace's trained model, which exported the served one
            # what /v1/training showed while it trained: the epochs and dev F1 of the experiment's train stage
            assert job["epoch"] == 10 and job["dev_f1_so_far"] is not None
            assert list(job["timeline"]) == ["snapshot", "train", "score", "gate", "promote", "repredict", "done"]
            assert job["pushed"] == {"created": len(unlabeled), "skipped_existing": 0}
            assert client.get("/v1/model").json()["model_version"] == promoted
            assert report["served_version"] == promoted

            # the experiment is DVC's: dvc exp show lists it with its metrics
            shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=loop_project,
                                   env={**env, "PATH": env["PATH"]}, capture_output=True, text=True, check=True)
            assert promoted in shown.stdout

            # every unlabeled task holds exactly one prediction of the new version, with the new model's entities
            tasks = list(LabelStudioClient(label_studio.url, label_studio.api_key).iter_tasks(project.id))
            fresh = [t for t in tasks if not t["annotations"]]
            assert len(fresh) == len(unlabeled)
            for task in fresh:
                predictions = [p for p in ls.predictions.list(task=task["id"]) if p.model_version == promoted]
                assert len(predictions) == 1, (task["id"], predictions)
                labels = {r["value"]["text"]: r["value"]["labels"][0] for r in predictions[0].result}
                assert set(labels.values()) <= {"person", "geo-loc"} and labels, labels

            # corrupt the training side (person <-> geo-loc); dev and test keep their true labels
            for task in tasks:
                if task["annotations"] and split_of(task["data"]["text"], 0.1, 0.1) == "train":
                    for annotation in task["annotations"]:
                        result = [{**r, "value": {**r["value"], "labels": [SWAP[r["value"]["labels"][0]]]}}
                                  for r in annotation["result"]]
                        ls.annotations.update(id=annotation["id"], result=result)
            ls.ml.train(id=ml.id)
            report = wait_for_jobs(client, 2)
            second = report["history"][0]
            assert second["decision"] == "rejected", (second, svc.log_tail())
            assert "dev gain" in second["detail"] and second["served_version"] == promoted
            assert second["warm_from"] == promoted  # its weights came out of the first experiment's DVC cache
            assert client.get("/v1/model").json()["model_version"] == promoted
        assert traffic.sent > 10 and traffic.errors == []

        metrics = client.get("/metrics").text
        assert 'ner_training_jobs_total{decision="promoted"} 1.0' in metrics
        assert 'ner_training_jobs_total{decision="rejected"} 1.0' in metrics
        # Label Studio's own webhook for the backend (annotation events) was given the key: none was refused
        assert 'route="/webhook",status="401"' not in metrics
        assert metric(metrics, "ner_http_requests_total", route="/webhook", status="200") > 100
        registry = json.loads((loop_project / "models" / "registry.json").read_text())
        assert registry["served"] == promoted and [v["version"] for v in registry["versions"]] == [promoted]
        assert label_studio.api_key not in json.dumps(registry)
        assert label_studio.api_key not in client.get("/v1/training").text
