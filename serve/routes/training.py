"""The labelling loop's HTTP side: Label Studio's webhook (*Start Training*, annotation events), the legacy
``/train`` call, and ``GET /v1/training`` (what trains now, how the last jobs ended, what is served).

Label Studio 1.x sends *Start Training* as ``POST /webhook`` ``{"action": "START_TRAINING", "project": {...}}``
with the ML backend connection's basic auth, so the key check covers it like every other route. Annotation
events (``ANNOTATION_CREATED``, ``ANNOTATION_UPDATED``) come from a project webhook pointed at the same URL, with
an ``Authorization`` header set there (README).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException

from serve.errors import printable
from serve.schemas import TrainingResponse, WebhookResponse
from serve.state import ServiceState, service
from serve.training import ANNOTATION_EVENTS, TrainingManager, TrainingRefused

log = logging.getLogger("serve.app")

router = APIRouter(tags=["label studio"])
State = Annotated[ServiceState, Depends(service)]
TRAIN_ACTIONS = frozenset({"START_TRAINING"})


@router.post("/webhook", response_model=WebhookResponse,
             responses={409: {"description": "a training request for another project than the bound one"}})
def webhook(body: dict[str, Any], state: State) -> dict[str, str]:
    """Label Studio webhooks: START_TRAINING starts (or queues) a job; annotation events count towards
    ``loop.every_annotations``; any other action is accepted and logged."""
    action = body.get("action")
    action = action if isinstance(action, str) else ""
    if state.training is None or (action not in TRAIN_ACTIONS and action not in ANNOTATION_EVENTS):
        log.info("webhook %s", printable(action)[:64])
        return {"status": "ok", "training": "off" if state.training is None else "ignored"}
    project = _project_id(body.get("project"))
    if action in TRAIN_ACTIONS:
        return {"status": "ok", "training": _request(state.training, project, "Start Training")}
    return {"status": "ok", "training": state.training.annotation_event(project)}


@router.post("/train", response_model=WebhookResponse,
             responses={409: {"description": "a training request for another project than the bound one"}})
def train(body: dict[str, Any], state: State) -> dict[str, str]:
    """Label Studio's older *Start Training* call (``{"project": id, "annotations": [...]}``): same as the
    webhook's START_TRAINING; the job reads the annotations from its own snapshot of the project."""
    if state.training is None:
        raise HTTPException(status_code=409, detail="training is off in this service (NER_LOOP=0, or no params "
                                                    "file: run python -m serve from the project folder)")
    return {"status": "ok", "training": _request(state.training, _project_id(body.get("project")), "/train")}


@router.get("/v1/training", response_model=TrainingResponse, tags=["ner"])
def training(state: State) -> dict[str, Any]:
    """The current job (state, stage, epoch, dev F1 so far, elapsed), the last jobs with their decision and
    figures, and the version served now."""
    report = state.training.report() if state.training else {"project": None, "current": None, "pending": False,
                                                              "history": []}
    return {**report, "enabled": state.training is not None, "served_version": state.runtime.model_version}


def _request(manager: TrainingManager, project: int, reason: str) -> str:
    try:
        return manager.request(project, reason)
    except TrainingRefused as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None


def _project_id(project: Any) -> int:
    """Label Studio sends the project as an object with ``id`` (webhooks) or an id (``/train``); 422 otherwise."""
    value = project.get("id") if isinstance(project, dict) else project
    if isinstance(value, str) and value.split(".")[0].isdigit():
        value = int(value.split(".")[0])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HTTPException(status_code=422, detail="project: a Label Studio project id (or an object with id) "
                                                    "is required to train")
    return value
