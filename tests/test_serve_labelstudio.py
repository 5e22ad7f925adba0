"""A real Label Studio server connects to the service as its ML backend and stores the service's predictions."""

from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.service_process import ServiceProcess

pytestmark = [pytest.mark.labelstudio, pytest.mark.slow]
API_KEY = "ml-backend-key-789"
CONFIG_XML = (ROOT / "data" / "labelstudio" / "label_config.xml").read_text(encoding="utf-8")
TEXTS = ["Barack Obama visited Paris and met Angela Merkel", "😀 Apple opened a store in 北京 near New York"]


@pytest.fixture(scope="module")
def backend(forced_onnx, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-ls") / "serve.log"
    with ServiceProcess(forced_onnx, log, env={"NER_API_KEY": API_KEY}) as proc:
        yield proc


def test_label_studio_gets_predictions_from_the_service_as_ml_backend(label_studio, backend):
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    service = httpx.Client(base_url=backend.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    model_version = service.get("/v1/model").json()["model_version"]
    expected = service.post("/v1/ner", json={"texts": TEXTS}).json()["results"]

    project = ls.projects.create(title="ml backend", label_config=CONFIG_XML)
    # Label Studio checks /health and calls /setup here, with its basic-auth settings on every call
    ml = ls.ml.create(project=project.id, url=backend.url, title="ner service", is_interactive=True,
                      auth_method="BASIC_AUTH", basic_auth_user="label-studio", basic_auth_pass=API_KEY)
    assert ml.id
    ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in TEXTS])
    tasks = {t.data["text"]: t for t in ls.tasks.list(project=project.id)}
    assert set(tasks) == set(TEXTS)

    # "Retrieve predictions" in the data manager: Label Studio posts the tasks to /predict and stores the results
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id,
                      selected_items={"all": True, "excluded": []})

    for text, want in zip(TEXTS, expected):
        predictions = ls.predictions.list(task=tasks[text].id)
        assert [p.model_version for p in predictions] == [model_version], label_studio.log_tail()
        [prediction] = predictions
        assert len(prediction.result) >= 3  # the forced model tags every word: the comparison has content
        regions = sorted((r["value"]["start"], r["value"]["end"], r["value"]["text"], r["value"]["labels"][0])
                         for r in prediction.result)
        assert regions == sorted((e["start"], e["end"], e["text"], e["label"]) for e in want["entities"])
        for r in prediction.result:
            assert (r["from_name"], r["to_name"], r["type"]) == ("label", "text", "labels")
        assert prediction.score == pytest.approx(want["score"], abs=1e-6)

    # every call from Label Studio carried the key (basic auth): no 401 was answered to it
    metrics = service.get("/metrics").text
    assert 'route="/predict",status="200"' in metrics and 'route="/setup",status="200"' in metrics
    assert 'route="/predict",status="401"' not in metrics and 'route="/setup",status="401"' not in metrics


def test_label_studio_cannot_connect_the_backend_with_a_wrong_key(label_studio, backend):
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    project = ls.projects.create(title="ml backend, wrong key", label_config=CONFIG_XML)
    # Label Studio's connection check calls /setup, which needs the key: a wrong one is refused at connect time
    with pytest.raises(ApiError) as refused:
        ls.ml.create(project=project.id, url=backend.url, title="wrong key", auth_method="BASIC_AUTH",
                     basic_auth_user="label-studio", basic_auth_pass="not-the-key")
    assert refused.value.status_code == 400


def calls(service: httpx.Client, route: str) -> float:
    """Requests the service answered on ``route``, any status (its Prometheus counter)."""
    total = 0.0
    for family in text_string_to_metric_families(service.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "ner_http_requests_total" and sample.labels.get("route") == route:
                total += sample.value
    return total


def test_retrieve_predictions_on_600_tasks_is_one_predict_call_and_every_task_gets_its_prediction(
        label_studio, backend):
    """The data manager's "Retrieve predictions" sends the whole selection in one /predict (Label Studio's
    ``MLBackend.predict_tasks``); it must be answered whole, or Label Studio stores nothing for any task."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key, timeout=300)
    service = httpx.Client(base_url=backend.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    model_version = service.get("/v1/model").json()["model_version"]
    project = ls.projects.create(title="bulk retrieve", label_config=CONFIG_XML)
    ls.ml.create(project=project.id, url=backend.url, title="ner service", is_interactive=True,
                 auth_method="BASIC_AUTH", basic_auth_user="label-studio", basic_auth_pass=API_KEY)
    texts = [f"Task {i}: {TEXTS[i % 2]}" for i in range(600)]
    imported = ls.projects.import_tasks(id=project.id, request=[{"text": t} for t in texts], return_task_ids=True)
    task_ids = set(imported.task_ids)
    assert len(task_ids) == 600

    predict_before = calls(service, "/predict")
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id,
                      selected_items={"all": True, "excluded": []})
    assert calls(service, "/predict") - predict_before == 1, label_studio.log_tail()

    predictions = ls.predictions.list(project=project.id)
    per_task = Counter(p.task for p in predictions if p.model_version == model_version)
    assert set(per_task) == task_ids and set(per_task.values()) == {1}, label_studio.log_tail()
    assert all(len(p.result) >= 3 for p in predictions)  # the forced model tags every word of every task
