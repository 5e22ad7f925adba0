"""The service's request and response bodies (pydantic): what OpenAPI shows and what FastAPI validates."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class NerRequest(BaseModel):
    texts: list[str] = Field(min_length=1, description="texts to tag")


class EntityOut(BaseModel):
    start: int = Field(description="character offset (Python string index) of the first character")
    end: int = Field(description="offset after the last character")
    text: str
    label: str
    score: float = Field(description="mean marginal probability of the entity's tags")


class TextResult(BaseModel):
    entities: list[EntityOut]
    score: float = Field(description="probability of the whole decoded tag sequence")
    confidence: dict[str, float] = Field(default_factory=dict, description=(
        "the three confidences active learning sorts by (sequence, min_entity, entropy), low = doubtful"))


class NerResponse(BaseModel):
    model_version: str
    results: list[TextResult]


class ModelResponse(BaseModel):
    model_version: str
    labels: list[str]
    scheme: str | None = None
    model_dir: str
    graph: str  # the ONNX file served: model.onnx, or the int8 graph chosen for this CPU
    cpu: str    # this CPU and the ISA extensions that chose it


class HealthResponse(BaseModel):
    status: str
    model_version: str


class SetupRequest(BaseModel):
    project: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: Any = None


class SetupResponse(BaseModel):
    model_version: str


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class PredictResponse(BaseModel):
    results: list[dict[str, Any]] = Field(description="one Label Studio prediction per task, in task order")


class WebhookResponse(BaseModel):
    status: str
    training: str = Field(description="what the event did: started, queued, coalesced (into the queued job), "
                                       "counted, ignored, or off")


class TrainingResponse(BaseModel):
    enabled: bool = Field(description="whether Start Training trains (NER_LOOP and a params file)")
    project: int | None = Field(description="the Label Studio project this service trains for")
    served_version: str
    current: dict[str, Any] | None = Field(description="the running job: state, stage, epoch, dev_f1_so_far, "
                                                       "elapsed_s, ...")
    pending: bool = Field(description="a follow-up job is queued")
    history: list[dict[str, Any]] = Field(description="the last finished jobs, newest first, with decision "
                                                      "(promoted, rejected, failed, interrupted), detail, figures")
