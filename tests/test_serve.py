"""The service over real HTTP: uvicorn on a free loopback port, httpx as the client."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
API_KEY = "test-serving-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(pipeline_run):
    port = free_port()
    env = dict(os.environ, NER_API_KEY=API_KEY)
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model-dir", str(pipeline_run.path("onnx_dir")),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
    else:
        proc.kill()
        raise AssertionError("service did not become healthy")
    yield httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    proc.terminate()
    proc.wait(timeout=20)


def test_ner_api_returns_entities_with_exact_offsets_and_matches_the_runtime(service, pipeline_run):
    from pipeline.inference import NerRuntime

    texts = ["😀 Barack Obama visited 北京 today", "Apple and Google in New York", ""]
    response = service.post("/v1/ner", json={"texts": texts})
    assert response.status_code == 200
    body = response.json()
    direct = NerRuntime(pipeline_run.path("onnx_dir")).predict(texts)
    assert body["results"] == [p.to_dict() for p in direct]
    for text, result in zip(texts, body["results"]):
        for entity in result["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"]


def test_label_studio_predict_protocol(service, pipeline_run):
    config = (ROOT / "data" / "labelstudio" / "label_config.xml").read_text()
    setup = service.post("/setup", json={"project": "3.1700000000", "schema": config})
    assert setup.status_code == 200 and setup.json()["model_version"]
    tasks = [{"id": 1, "data": {"text": "Barack Obama in Paris"}}, {"id": 2, "data": {"text": "东京 😀"}}]
    response = service.post("/predict", json={"tasks": tasks, "project": "3.1700000000", "label_config": config})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 2
    for task, result in zip(tasks, results):
        assert result["model_version"] == setup.json()["model_version"]
        for region in result["result"]:
            assert region["from_name"] == "label" and region["to_name"] == "text"
            assert task["data"]["text"][region["value"]["start"]:region["value"]["end"]] == region["value"]["text"]


def test_label_config_without_our_labels_is_a_clear_4xx(service):
    config = '<View><Labels name="ner" toName="t"><Label value="PER"/></Labels><Text name="t" value="$t"/></View>'
    response = service.post("/predict", json={"tasks": [{"data": {"t": "x"}}], "label_config": config})
    assert response.status_code == 422
    assert "not in the project's label config" in response.text


def test_bad_input_is_4xx_never_500(service):
    assert service.post("/v1/ner", json={"texts": "not a list"}).status_code == 422
    assert service.post("/v1/ner", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert service.post("/v1/ner", json={"texts": []}).status_code == 422
    assert service.post("/v1/ner", json={"texts": ["x"] * 1000}).status_code == 413


def test_api_key_is_required_except_for_health(service):
    bare = httpx.Client(base_url=str(service.base_url), timeout=30)
    assert bare.get("/health").status_code == 200
    assert bare.post("/v1/ner", json={"texts": ["hi"]}).status_code == 401
    assert bare.post("/v1/ner", json={"texts": ["hi"]}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    basic = httpx.Client(base_url=str(service.base_url), auth=("user", API_KEY), timeout=30)
    assert basic.post("/v1/ner", json={"texts": ["hi"]}).status_code == 200
