"""HTTP routes over the shared inference runtime: a plain NER API and the Label Studio ML-backend protocol.

Endpoints are plain ``def`` functions, so FastAPI runs inference in its
thread pool and the event loop stays free.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from pipeline.errors import LabelConfigMismatch
from pipeline.inference import NerRuntime
from pipeline.labelconfig import LabelConfig, check_labels, parse_label_config
from pipeline.predict import to_ls_prediction

log = logging.getLogger(__name__)

API_KEY_ENV = "NER_API_KEY"


class NerRequest(BaseModel):
    texts: list[str] = Field(min_length=1, description="texts to tag")


class EntityOut(BaseModel):
    start: int
    end: int
    text: str
    label: str
    score: float


class TextResult(BaseModel):
    entities: list[EntityOut]
    score: float


class NerResponse(BaseModel):
    model_version: str
    results: list[TextResult]


class SetupRequest(BaseModel):
    project: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = None
    extra_params: Any = None


class PredictRequest(BaseModel):
    tasks: list[dict[str, Any]]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


def create_app(model_dir: str | Path, *, api_key: str | None = None, max_texts: int = 256,
               max_chars: int = 100_000) -> FastAPI:
    runtime = NerRuntime(model_dir)
    configs: dict[str, LabelConfig] = {}
    app = FastAPI(title="NER service", version=runtime.model_version,
                  description="BERT-BiLSTM-CRF entities with character offsets; also a Label Studio ML backend.")

    def authorize(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "basic":
            import base64
            import binascii

            try:
                token = base64.b64decode(token).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                token = ""
        elif scheme.lower() not in ("bearer", "token"):
            token = ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong API key",
                                headers={"WWW-Authenticate": "Bearer"})

    def check_size(texts: list[str]) -> None:
        if len(texts) > max_texts:
            raise HTTPException(status_code=413, detail=f"{len(texts)} texts; at most {max_texts} per request")
        for i, text in enumerate(texts):
            if len(text) > max_chars:
                raise HTTPException(status_code=413,
                                    detail=f"text {i} has {len(text)} characters; at most {max_chars}")

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_version": runtime.model_version}

    @app.get("/v1/model", dependencies=[Depends(authorize)])
    def model_info() -> dict[str, Any]:
        return {"model_version": runtime.model_version, "labels": runtime.entity_types,
                "scheme": runtime.info.get("scheme")}

    @app.post("/v1/ner", response_model=NerResponse, dependencies=[Depends(authorize)])
    def ner(body: NerRequest) -> NerResponse:
        check_size(body.texts)
        preds = runtime.predict(body.texts)
        return NerResponse(model_version=runtime.model_version,
                           results=[TextResult(**p.to_dict()) for p in preds])

    @app.post("/setup", dependencies=[Depends(authorize)])
    def setup(body: SetupRequest) -> dict[str, str]:
        if body.schema_:
            config = _config_or_422(body.schema_, runtime)
            configs[_project_key(body.project)] = config
        return {"model_version": runtime.model_version}

    @app.post("/predict", dependencies=[Depends(authorize)])
    def predict(body: PredictRequest) -> dict[str, Any]:
        if body.label_config:
            config = _config_or_422(body.label_config, runtime)
        elif _project_key(body.project) in configs:
            config = configs[_project_key(body.project)]
        else:
            raise HTTPException(status_code=422, detail="no label_config in the request and no /setup for project")
        texts = []
        for i, task in enumerate(body.tasks):
            text = (task.get("data") or {}).get(config.data_key)
            if not isinstance(text, str):
                raise HTTPException(status_code=422,
                                    detail=f"task {task.get('id', i)}: data.{config.data_key} must be a string")
            texts.append(text)
        check_size(texts)
        preds = runtime.predict(texts)
        return {"results": [to_ls_prediction(p, config, runtime.model_version) for p in preds]}

    @app.post("/webhook", dependencies=[Depends(authorize)])
    def webhook(body: dict[str, Any]) -> dict[str, str]:
        log.info("webhook %s", body.get("action"))
        return {"status": "ok"}

    return app


def _project_key(project: str | None) -> str:
    """Label Studio sends ``"<id>.<timestamp>"``; the id is the project."""
    return (project or "").split(".")[0]


def _config_or_422(xml: str, runtime: NerRuntime) -> LabelConfig:
    try:
        config = parse_label_config(xml)
        check_labels(runtime.entity_types, config)
    except LabelConfigMismatch as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return config


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory serve.app:app_from_env``."""
    return create_app(os.environ.get("NER_MODEL_DIR", "models/onnx"), api_key=os.environ.get(API_KEY_ENV) or None)
