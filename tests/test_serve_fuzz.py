"""Schemathesis fuzzes every operation of the service's own OpenAPI schema over real HTTP: never a 5xx."""

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.conftest import ROOT
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.slow
API_KEY = "fuzz-key-456"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fuzz_svc(pipeline_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-fuzz") / "serve.log"
    # small limits, so that generated inputs also reach the 413 paths
    env = {"NER_API_KEY": API_KEY, "NER_MAX_TEXTS": "8", "NER_MAX_CHARS": "2000", "NER_MAX_BODY_BYTES": "65536",
           "NER_MAX_PREDICT_TASKS": "16", "NER_MAX_PREDICT_BODY_BYTES": "131072", "NER_MAX_WAIT_MS": "1"}
    # the labelling loop on, in a folder of its own: a fuzzed START_TRAINING starts a real job there, which
    # fails at once (no Label Studio in the environment) and leaves the service as it was
    workspace = log.parent / "workspace"
    workspace.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    env.update({"LABEL_STUDIO_URL": "", "LABEL_STUDIO_API_KEY": ""})
    with ServiceProcess(pipeline_run.path("onnx_dir"), log, env=env, cwd=workspace) as proc:
        yield proc


# Every operation of the schema, listed here so that pytest shows one test per operation; a test below
# checks that the list and the schema agree. (schemathesis' own `pytest.from_fixture` loader does not run
# under pytest 9: it reads `Function._nodeid`, which pytest 9 removed.)
OPERATIONS = [("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/model"),
              ("POST", "/v1/ner"), ("POST", "/setup"), ("POST", "/predict"), ("POST", "/webhook"),
              ("POST", "/train"), ("GET", "/v1/training")]


@pytest.fixture(scope="module")
def api_schema(fuzz_svc):
    return schemathesis.openapi.from_url(f"{fuzz_svc.url}/openapi.json", headers=AUTH)


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_input_makes_the_service_fail(api_schema, fuzz_svc, method, path):
    operation = api_schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    statuses = []

    @given(case=cases)
    @settings(max_examples=30, suppress_health_check=list(HealthCheck), deadline=None, database=None)
    def call(case):
        response = case.call(base_url=fuzz_svc.url, headers=AUTH, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])
        statuses.append(response.status_code)

    call()
    assert statuses and max(statuses) < 500


CONFIG_XML = (ROOT / "data" / "labelstudio" / "label_config.xml").read_text(encoding="utf-8")


@given(texts=st.lists(st.text(max_size=300), min_size=1, max_size=4))
@settings(max_examples=30, suppress_health_check=list(HealthCheck), deadline=None, database=None)
def test_any_unicode_text_is_tagged_with_exact_offsets_over_both_protocols(fuzz_svc, texts):
    with httpx.Client(base_url=fuzz_svc.url, headers=AUTH, timeout=60) as client:
        ner = client.post("/v1/ner", json={"texts": texts})
        tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
        predict = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG_XML})
    assert ner.status_code == 200, ner.text
    assert predict.status_code == 200, predict.text
    results = ner.json()["results"]
    assert len(results) == len(texts) == len(predict.json()["results"])
    for text, result, prediction in zip(texts, results, predict.json()["results"]):
        assert [(e["start"], e["end"], e["label"]) for e in result["entities"]] == [
            (r["value"]["start"], r["value"]["end"], r["value"]["labels"][0]) for r in prediction["result"]]
        for entity in result["entities"]:
            assert 0 <= entity["start"] < entity["end"] <= len(text)
            assert text[entity["start"]:entity["end"]] == entity["text"]


def test_the_service_is_still_ready_after_fuzzing(fuzz_svc):
    assert httpx.get(f"{fuzz_svc.url}/ready", timeout=30).status_code == 200
    assert "Traceback" not in fuzz_svc.log_tail(10**7)
