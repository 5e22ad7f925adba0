"""The service's job manager without a Label Studio server: one job at a time, follow-ups coalesce, another
project is refused, a service killed mid-job leaves the job ``interrupted`` after a restart, and a job that
cannot reach Label Studio fails with its cause while the served model stays.

Jobs here are real ``python -m pipeline loop-job`` processes; the Label Studio they are pointed at is a
loopback socket that accepts connections and never answers (a hung server), or nothing at all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.service_process import ServiceProcess

API_KEY = "jobs-key-1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A folder with a params file (the service's loop reads it); the jobs fail before they need more."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"]["loop_dir"] = "loop"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.fixture
def hung_server():
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def wait(client: httpx.Client, done, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = client.get("/v1/training").json()
        if done(report):
            return report
        time.sleep(0.3)
    raise AssertionError(f"/v1/training never reached the expected state: {report}")


def start_training(client: httpx.Client, project: int = 7) -> httpx.Response:
    return client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project, "title": "p"}})


def test_events_during_a_job_coalesce_into_one_follow_up_and_another_project_is_refused(
        pipeline_run, workspace, hung_server):
    env = {"NER_API_KEY": API_KEY, "LABEL_STUDIO_URL": hung_server, "LABEL_STUDIO_API_KEY": "secret-token-abc"}
    with ServiceProcess(pipeline_run.path("onnx_dir"), workspace / "serve.log", env=env, cwd=workspace) as svc, \
            httpx.Client(base_url=svc.url, headers=AUTH, timeout=30) as client:
        assert client.get("/v1/training").json()["enabled"] is True
        assert start_training(client).json()["training"] == "started"
        assert start_training(client).json()["training"] == "queued"
        assert start_training(client).json()["training"] == "coalesced"
        refused = start_training(client, project=8)
        assert refused.status_code == 409 and "project 7" in refused.json()["detail"]
        assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 422
        assert httpx.post(f"{svc.url}/webhook", json={"action": "START_TRAINING", "project": 7}).status_code == 401
        report = client.get("/v1/training").json()
        assert report["project"] == 7 and report["pending"] is True
        assert report["current"]["stage"] in ("queued", "snapshot") and report["current"]["state"] == "running"
        # the job hangs on the silent server: stopping the service stops it, and the queued one never starts
    with ServiceProcess(pipeline_run.path("onnx_dir"), workspace / "serve.log", env=env, cwd=workspace) as svc, \
            httpx.Client(base_url=svc.url, headers=AUTH, timeout=30) as client:
        report = client.get("/v1/training").json()
        assert [j["decision"] for j in report["history"]] == ["interrupted"]
        assert report["current"] is None and report["project"] == 7
        assert "secret-token-abc" not in json.dumps(report)


def test_a_service_killed_mid_job_shows_it_interrupted_and_its_process_stopped_after_a_restart(
        pipeline_run, workspace, hung_server):
    env = {"NER_API_KEY": API_KEY, "LABEL_STUDIO_URL": hung_server, "LABEL_STUDIO_API_KEY": "k" * 40}
    with ServiceProcess(pipeline_run.path("onnx_dir"), workspace / "serve.log", env=env, cwd=workspace) as svc, \
            httpx.Client(base_url=svc.url, headers=AUTH, timeout=30) as client:
        start_training(client)
        job_id = client.get("/v1/training").json()["current"]["job_id"]
        pid = json.loads((workspace / "loop" / "jobs" / job_id / "status.json").read_text())["pid"]
        svc.signal(signal.SIGKILL)  # no shutdown at all: the job process lives on, orphaned
        svc.proc.wait()
    assert Path(f"/proc/{pid}").exists()
    with ServiceProcess(pipeline_run.path("onnx_dir"), workspace / "serve.log", env=env, cwd=workspace) as svc, \
            httpx.Client(base_url=svc.url, headers=AUTH, timeout=30) as client:
        [job] = client.get("/v1/training").json()["history"]
        assert job["job_id"] == job_id and job["decision"] == "interrupted"
        assert "start training again" in job["detail"]
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), "the orphaned job process was not stopped"
        assert start_training(client).json()["training"] == "started"  # training can start again


def test_a_job_that_cannot_reach_label_studio_fails_with_its_cause_and_the_model_stays(pipeline_run, workspace):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"NER_API_KEY": API_KEY, "LABEL_STUDIO_URL": closed, "LABEL_STUDIO_API_KEY": "k" * 40}
    with ServiceProcess(pipeline_run.path("onnx_dir"), workspace / "serve.log", env=env, cwd=workspace,
                        args=[]) as svc, httpx.Client(base_url=svc.url, headers=AUTH, timeout=30) as client:
        version = client.get("/v1/model").json()["model_version"]
        start_training(client)
        report = wait(client, lambda r: r["history"], timeout=300)
        [job] = report["history"]
        assert job["decision"] == "failed" and job["stage"] == "done"
        assert job["detail"].startswith("snapshot: ") and closed in job["detail"], job
        assert client.get("/v1/model").json()["model_version"] == version
        assert 'ner_training_jobs_total{decision="failed"} 1.0' in client.get("/metrics").text


def test_the_loop_is_off_without_a_params_file_with_no_loop_and_with_workers(pipeline_run, workspace, tmp_path):
    env = {"NER_API_KEY": API_KEY}
    bare = tmp_path / "bare"
    bare.mkdir()
    for cwd, args in ((bare, []), (ROOT, ["--no-loop"]), (workspace, ["--workers", "2"])):
        with ServiceProcess(pipeline_run.path("onnx_dir"), tmp_path / "serve.log", env=env, cwd=cwd,
                            args=args) as svc, httpx.Client(base_url=svc.url, headers=AUTH, timeout=30) as client:
            assert client.get("/v1/training").json()["enabled"] is False
            assert start_training(client).json() == {"status": "ok", "training": "off"}
            assert client.post("/train", json={"project": 7}).status_code == 409
    assert not os.path.exists(bare / "data" / "loop") and not os.path.exists(workspace / "loop" / "jobs")


def test_every_n_annotation_events_start_a_job(pipeline_run, workspace, hung_server):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["loop"]["every_annotations"] = 3
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"NER_API_KEY": API_KEY, "LABEL_STUDIO_URL": hung_server, "LABEL_STUDIO_API_KEY": "k" * 40}
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 4}, "annotation": {"id": 1}, "task": {"id": 2}}
    with ServiceProcess(pipeline_run.path("onnx_dir"), workspace / "serve.log", env=env, cwd=workspace) as svc, \
            httpx.Client(base_url=svc.url, headers=AUTH, timeout=30) as client:
        answers = [client.post("/webhook", json=event).json()["training"] for _ in range(4)]
        assert answers == ["counted", "counted", "started", "counted"]
        assert client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 4}}).json()[
            "training"] == "ignored"
        assert client.get("/v1/training").json()["current"]["reason"] == "3 new or updated annotations"
