"""The Label Studio ML-backend protocol: ``/setup`` and ``/predict`` (``/health`` is a probe; ``/webhook`` and
``/train`` are the loop's, in ``training.py``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from pipeline.labelstudio.regions import to_ls_prediction
from serve.errors import SafeJSONResponse
from serve.schemas import PredictRequest, PredictResponse, SetupRequest, SetupResponse
from serve.state import ServiceState, project_key, service, task_texts

router = APIRouter(tags=["label studio"])
State = Annotated[ServiceState, Depends(service)]


@router.post("/setup", response_model=SetupResponse, responses={413: {"description": "label config too long"}})
def setup(body: SetupRequest, state: State) -> dict[str, str]:
    """Label Studio ML backend: reloads the model if its folder changed; checks the project's labels."""
    state.reloader.check()
    if body.schema_:
        config = state.label_configs.parse(body.schema_, "schema")  # a sync route: runs in a worker thread
        state.labels_or_422(config)
        state.projects.remember(body.project, config)
    if state.training is not None and project_key(body.project).isdigit():
        state.training.connect(int(project_key(body.project)))
    return {"model_version": state.runtime.model_version}


@router.post("/predict", response_model=PredictResponse,
             responses={413: {"description": "too many tasks (NER_MAX_PREDICT_TASKS), a text or the label "
                                             "config too long"}})
async def predict(body: PredictRequest, state: State) -> Any:
    """Label Studio ML backend: one prediction per task, regions named after the label config."""
    if body.label_config:
        config = await run_in_threadpool(state.label_configs.parse, body.label_config, "label_config")
    else:
        config = state.projects.get(body.project)
        if config is None:
            raise HTTPException(status_code=422, detail="no label_config in the request and no /setup for project")
    state.labels_or_422(config)
    texts, names = task_texts(body.tasks, config.data_key)
    state.check_tasks(texts, names)
    out = await state.run(texts)  # the batcher plans a chunk at a time and interleaves it with other requests
    if len(texts) <= SMALL:
        return {"results": [to_ls_prediction(p, config, out.model_version) for p in out.predictions]}
    return await run_in_threadpool(_bulk_answer, out.predictions, config, out.model_version)


#: Up to this many tasks the answer is built on the event loop; a bulk "Retrieve predictions" (thousands of tasks)
#: is converted and rendered to JSON in a worker thread, so other requests are not held up meanwhile.
SMALL = 64


def _bulk_answer(predictions: list[Any], config: Any, model_version: str) -> Response:
    results = [to_ls_prediction(p, config, model_version) for p in predictions]
    return SafeJSONResponse({"results": results})  # rendered here, in the thread; same body as the response model
