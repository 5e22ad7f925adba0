"""The service over real HTTP: `python -m serve` on a free loopback port, httpx as the client."""

import json
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.slow
API_KEY = "test-serving-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 1_000_000
MAX_PREDICT_TASKS = 3_000
MAX_PREDICT_BODY = 2_000_000


@pytest.fixture(scope="module")
def svc(forced_onnx, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with ServiceProcess(forced_onnx, log,
                        env={"NER_API_KEY": API_KEY, "NER_MAX_BODY_BYTES": str(MAX_BODY),
                             "NER_MAX_PREDICT_TASKS": str(MAX_PREDICT_TASKS),
                             "NER_MAX_PREDICT_BODY_BYTES": str(MAX_PREDICT_BODY)}) as proc:
        yield proc


@pytest.fixture(scope="module")
def service(svc):
    with httpx.Client(base_url=svc.url, headers=AUTH, timeout=60) as client:
        yield client


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the service's /metrics (0 if absent)."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_ner_api_returns_entities_with_exact_offsets_and_matches_the_runtime(service, forced_onnx):
    from pipeline.runtime.inference import NerRuntime

    texts = ["😀 Barack Obama visited 北京 today", "Apple and Google in New York", ""]
    response = service.post("/v1/ner", json={"texts": texts})
    assert response.status_code == 200
    body = response.json()
    direct = NerRuntime(forced_onnx).predict(texts)
    assert body["results"] == [p.to_dict() for p in direct]
    assert all(r["entities"] for t, r in zip(texts, body["results"]) if t)  # the forced model tags every word
    for text, result in zip(texts, body["results"]):
        for entity in result["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"]
    assert service.get("/v1/model").json()["graph"] == "model.onnx"


def test_an_int8_service_serves_the_int8_graph_chosen_for_this_cpu(forced_onnx, tmp_path):
    from pipeline.core.cpu import cpu_info, describe
    from pipeline.runtime.inference import NerRuntime

    texts = ["Barack Obama visited 北京 today", "Apple and Google in New York"]
    with ServiceProcess(forced_onnx, tmp_path / "serve.log", env={"NER_API_KEY": API_KEY, "NER_QUANTIZED": "1"}) as svc:
        with httpx.Client(base_url=svc.url, headers=AUTH, timeout=60) as client:
            model = client.get("/v1/model").json()
            body = client.post("/v1/ner", json={"texts": texts}).json()
    # model.int8-avx2.onnx on a CPU without VNNI (7-bit weights), model.int8.onnx on one with it
    assert model["graph"] == ("model.int8.onnx" if cpu_info()["vnni"] else "model.int8-avx2.onnx")
    assert model["cpu"] == describe() and model["model_version"] == body["model_version"]
    direct = NerRuntime(forced_onnx, quantized=True)
    assert body["results"] == [p.to_dict() for p in direct.predict(texts)]
    assert body["model_version"] == direct.model_version != NerRuntime(forced_onnx).model_version


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
        assert result["result"]  # the forced model tags every word: the offsets below are really checked
        for region in result["result"]:
            assert region["from_name"] == "label" and region["to_name"] == "text"
            assert task["data"]["text"][region["value"]["start"]:region["value"]["end"]] == region["value"]["text"]
    # after /setup the project's config is remembered: Label Studio may leave label_config out
    again = service.post("/predict", json={"tasks": tasks, "project": "3.1700000001"})
    assert again.status_code == 200 and again.json() == response.json()


def test_predict_takes_a_whole_label_studio_selection_beyond_the_per_request_limits_of_v1_ner(service):
    """Label Studio's "Retrieve predictions" sends every selected task in one /predict: more tasks than /v1/ner's
    NER_MAX_TEXTS (256) and a body larger than NER_MAX_BODY_BYTES; its own caps answer a clear 413."""
    config = (ROOT / "data" / "labelstudio" / "label_config.xml").read_text()
    tasks = [{"id": i, "data": {"text": f"Task {i}: Barack Obama visited Paris"}, "annotations": [],
              "predictions": [], "meta": {}, "project": 1, "pad": "x" * 300} for i in range(MAX_PREDICT_TASKS)]
    body = json.dumps({"tasks": tasks, "project": "1.1700000000", "label_config": config}).encode()
    assert MAX_BODY < len(body) < MAX_PREDICT_BODY
    response = service.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text[:300]
    results = response.json()["results"]
    assert len(results) == len(tasks)
    for task, result in zip(tasks[:: 500], results[:: 500]):  # in task order, offsets into each task's own text
        for region in result["result"]:
            assert task["data"]["text"][region["value"]["start"]:region["value"]["end"]] == region["value"]["text"]
    assert results[7] == service.post("/predict", json={"tasks": [tasks[7]], "label_config": config}).json()[
        "results"][0]

    too_many = service.post("/predict", json={"tasks": [{"data": {"text": "x"}}] * (MAX_PREDICT_TASKS + 1),
                                              "label_config": config})
    assert too_many.status_code == 413
    assert too_many.json()["detail"] == (f"{MAX_PREDICT_TASKS + 1} tasks; at most {MAX_PREDICT_TASKS} per /predict "
                                         "(NER_MAX_PREDICT_TASKS): select fewer")
    too_big = json.dumps({"tasks": [{"data": {"text": "x" * 1000}}] * 2100, "label_config": config}).encode()
    assert len(too_big) > MAX_PREDICT_BODY
    assert service.post("/predict", content=too_big, headers={"content-type": "application/json"}).status_code == 413
    # /v1/ner keeps its limits
    assert service.post("/v1/ner", json={"texts": ["x"] * 257}).status_code == 413
    assert service.post("/v1/ner", content=body, headers={"content-type": "application/json"}).status_code == 413


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
    assert service.post("/v1/ner", json={"texts": ["x" * 100_001]}).status_code == 413
    # valid JSON, invalid Unicode: the tokenizer would raise on it
    lone = service.post("/v1/ner", content=b'{"texts": ["ok", "a\\ud800b"]}', headers={"content-type": "application/json"})
    assert lone.status_code == 422 and "text 1" in lone.json()["detail"]
    assert service.post("/predict", json={"tasks": [{"data": "x"}], "label_config": "<View/>"}).status_code == 422
    assert service.post("/setup", json={"schema": "<not xml"}).status_code == 422
    assert service.post("/predict", json={"tasks": [{"data": {"text": 5}}], "project": "3"}).status_code == 422


def test_body_over_the_limit_is_413_with_or_without_content_length(service):
    big = json.dumps({"texts": ["word " * 1000] * 250}).encode()
    assert len(big) > MAX_BODY
    assert service.post("/v1/ner", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks():
        for lo in range(0, len(big), 65536):
            yield big[lo:lo + 65536]

    chunked = service.post("/v1/ner", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert service.get("/ready").status_code == 200


def test_probes_answer_without_a_key(svc):
    health = httpx.get(f"{svc.url}/health", timeout=30)
    ready = httpx.get(f"{svc.url}/ready", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert ready.status_code == 200 and ready.json()["status"] == "READY"
    assert health.json()["model_version"] == ready.json()["model_version"]


def test_every_route_except_the_probes_needs_the_key(svc, service):
    schema = service.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "basic"}
    routes = [(method.upper(), path) for path, ops in schema["paths"].items() for method in ops]
    routes += [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc")]
    assert ("POST", "/v1/ner") in routes and ("GET", "/metrics") in routes
    wrong_keys = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {API_KEY}x"},
                  {"Authorization": API_KEY}, {"Authorization": "Basic !!!"}]
    with httpx.Client(base_url=svc.url, timeout=30) as bare:
        for method, path in routes:
            for headers in wrong_keys:
                response = bare.request(method, path, json={}, headers=headers)
                expected = 200 if path in ("/health", "/ready") else 401
                assert response.status_code == expected, (method, path, headers, response.text)
            if path not in ("/health", "/ready"):
                assert "www-authenticate" in response.headers
        assert bare.post("/v1/ner", json={"texts": ["hi"]}, auth=("user", API_KEY)).status_code == 200
        assert bare.post("/v1/ner", json={"texts": ["hi"]}, auth=("user", "wrong")).status_code == 401
        assert bare.post("/v1/ner", json={"texts": ["hi"]}, headers=AUTH).status_code == 200


def test_metrics_count_requests_by_route_and_status(service):
    before_ok = metric(service, "ner_http_requests_total", method="POST", route="/v1/ner", status="200")
    before_bad = metric(service, "ner_http_requests_total", method="POST", route="/v1/ner", status="422")
    before_latency = metric(service, "ner_http_request_duration_seconds_count", method="POST", route="/v1/ner")
    for _ in range(3):
        assert service.post("/v1/ner", json={"texts": ["Paris"]}).status_code == 200
    assert service.post("/v1/ner", json={"texts": 1}).status_code == 422
    assert service.get("/no/such/path").status_code == 404
    assert metric(service, "ner_http_requests_total", method="POST", route="/v1/ner", status="200") == before_ok + 3
    assert metric(service, "ner_http_requests_total", method="POST", route="/v1/ner", status="422") == before_bad + 1
    assert metric(service, "ner_http_request_duration_seconds_count", method="POST",
                  route="/v1/ner") == before_latency + 4
    assert metric(service, "ner_http_requests_total", route="<unmatched>", status="404") >= 1
    assert metric(service, "ner_batch_size_texts_count") >= 3
    version = service.get("/v1/model").json()["model_version"]
    assert metric(service, "ner_model_info", model_version=version) == 1
    text = service.get("/metrics").text
    for name in ("ner_http_request_duration_seconds_bucket", "ner_batch_size_requests_bucket",
                 "ner_batch_duration_seconds_bucket", "ner_shared_core_calls_total"):
        assert name in text


def access_lines(svc, path: str) -> list[dict]:
    """The access-log records of ``path`` so far, oldest first."""
    records = [json.loads(line.split("serve.access: ", 1)[1]) for line in svc.log_tail(10**7).splitlines()
               if "serve.access: " in line]
    return [rec for rec in records if rec["path"] == path]


def test_access_log_has_one_json_line_per_request_with_latency(svc, service):
    marker = "/v1/model?access-log-marker"
    before = len(access_lines(svc, "/v1/model"))
    assert service.get(marker).status_code == 200
    assert httpx.get(f"{svc.url}/v1/model", timeout=30).status_code == 401
    deadline = time.monotonic() + 30  # each line is written just after its answer went out
    while len(model_lines := access_lines(svc, "/v1/model")) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {rec["status"] for rec in model_lines[-2:]} == {200, 401}
    for rec in model_lines[-2:]:
        assert rec["method"] == "GET" and rec["route"] == "/v1/model"
        assert isinstance(rec["latency_ms"], float) and rec["latency_ms"] >= 0


# -- micro-batching over HTTP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batching_svc(pipeline_run, tmp_path_factory):
    # A long max wait and a batch of 8: the batcher waits for requests the server has already accepted, and a
    # full batch runs at once, so grouping does not depend on how fast this machine is.
    log = tmp_path_factory.mktemp("serve-batching") / "serve.log"
    with ServiceProcess(pipeline_run.path("onnx_dir"), log,
                        env={"NER_MAX_BATCH_SIZE": "8", "NER_MAX_WAIT_MS": "3000", "NER_API_KEY": ""}) as proc:
        yield proc


def test_concurrent_requests_are_grouped_into_one_runtime_call_and_routed_back(batching_svc, pipeline_run):
    from pipeline.runtime.inference import NerRuntime

    texts = [f"Barack Obama met {name} in New York" for name in
             ("Angela Merkel", "Apple", "Google", "Paris Hilton", "Lionel Messi", "北京", "😀 Taylor Swift", "Tokyo")]
    expected = [p.to_dict() for p in NerRuntime(pipeline_run.path("onnx_dir")).predict(texts)]
    with httpx.Client(base_url=batching_svc.url, timeout=60) as client:
        batches_before = metric(client, "ner_batch_size_requests_count")
        requests_before = metric(client, "ner_batch_size_requests_sum")
        barrier = threading.Barrier(len(texts))

        def one(text: str) -> dict:
            with httpx.Client(base_url=batching_svc.url, timeout=60) as own:
                own.get("/health")  # open the keep-alive connection first: then the posts go out together
                barrier.wait(30)
                response = own.post("/v1/ner", json={"texts": [text]})
                assert response.status_code == 200, response.text
                return response.json()["results"][0]

        with ThreadPoolExecutor(len(texts)) as pool:
            results = list(pool.map(one, texts))
        assert results == expected  # each request got its own text's result back
        assert metric(client, "ner_batch_size_requests_sum") - requests_before == len(texts)
        batches = metric(client, "ner_batch_size_requests_count") - batches_before
        assert batches < len(texts), "no two requests shared a runtime call"
        # the histogram shows a runtime call that served several requests
        assert metric(client, "ner_batch_size_requests_bucket", le="1.0") < metric(
            client, "ner_batch_size_requests_bucket", le="+Inf")


# -- hot reload -----------------------------------------------------------------------------------------------


def set_model_version(model_dir, version: str) -> None:
    """What a new export does to the folder, as far as the service can tell: a new model_info.json."""
    info = json.loads((model_dir / "model_info.json").read_text())
    info["model_version"] = version
    tmp = model_dir / "model_info.json.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(model_dir / "model_info.json")


@pytest.fixture(scope="module")
def reload_svc(pipeline_run, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("reload") / "onnx"
    shutil.copytree(pipeline_run.path("onnx_dir"), model_dir)
    # no polling: these tests reload by /setup and SIGHUP, at the moment they choose (the poll has its own test)
    env = {"NER_API_KEY": API_KEY, "NER_RELOAD_INTERVAL_S": "0"}
    with ServiceProcess(model_dir, model_dir.parent / "serve.log", env=env) as proc:
        yield proc


class Load:
    """Clients posting /v1/ner in a loop on threads, recording (sent_at, status, model_version)."""

    def __init__(self, url: str, clients: int = 6) -> None:
        self.url, self.stop, self.records, self.errors = url, threading.Event(), [], []
        self.threads = [threading.Thread(target=self.loop, args=(i,)) for i in range(clients)]

    def loop(self, i: int) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post("/v1/ner", json={"texts": [f"client {i} saw Obama in Paris"]})
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    continue
                version = response.json().get("model_version") if response.status_code == 200 else None
                self.records.append((sent, response.status_code, version))

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + 120
        target = len(self.records) + n
        while len(self.records) < target and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def test_setup_reloads_a_changed_model_while_concurrent_requests_all_succeed(reload_svc):
    client = httpx.Client(base_url=reload_svc.url, headers=AUTH, timeout=60)
    old = client.get("/v1/model").json()["model_version"]
    assert client.post("/setup", json={}).json() == {"model_version": old}  # unchanged folder: same model
    with Load(reload_svc.url) as load:
        load.wait_for(30)
        set_model_version(reload_svc.model_dir, "reloaded-by-setup")
        assert client.post("/setup", json={}).json() == {"model_version": "reloaded-by-setup"}
        swapped_at = time.monotonic()
        load.wait_for(30)
    assert load.errors == []
    assert {status for _, status, _ in load.records} == {200}
    assert {version for _, _, version in load.records} == {old, "reloaded-by-setup"}
    assert {version for sent, _, version in load.records if sent > swapped_at} == {"reloaded-by-setup"}
    assert client.get("/v1/model").json()["model_version"] == "reloaded-by-setup"
    assert metric(client, "ner_model_reloads_total", result="ok") == 1
    assert metric(client, "ner_model_info", model_version="reloaded-by-setup") == 1
    assert metric(client, "ner_model_info", model_version=old) == 0


def test_sighup_reloads_and_a_broken_folder_keeps_the_running_model(reload_svc):
    client = httpx.Client(base_url=reload_svc.url, headers=AUTH, timeout=60)
    before = client.get("/v1/model").json()["model_version"]
    crf = reload_svc.model_dir / "crf.json"
    good_crf = crf.read_text()
    crf.write_text("{broken")
    set_model_version(reload_svc.model_dir, "never-served")
    errors_before = metric(client, "ner_model_reloads_total", result="error")
    assert client.post("/setup", json={}).json() == {"model_version": before}
    assert metric(client, "ner_model_reloads_total", result="error") == errors_before + 1
    assert client.post("/v1/ner", json={"texts": ["still serving"]}).json()["model_version"] == before

    crf.write_text(good_crf)
    set_model_version(reload_svc.model_dir, "reloaded-by-sighup")
    with Load(reload_svc.url, clients=4) as load:
        load.wait_for(10)
        reload_svc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while client.get("/v1/model").json()["model_version"] != "reloaded-by-sighup":
            assert time.monotonic() < deadline, reload_svc.log_tail()
            time.sleep(0.1)
        load.wait_for(10)
    assert load.errors == [] and {status for _, status, _ in load.records} == {200}
    assert client.get("/ready").status_code == 200
