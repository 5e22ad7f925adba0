"""HTTP routes over the shared inference runtime: a plain NER API and the Label Studio ML-backend protocol.

Inference goes through the micro-batcher (``serve/batching.py``): concurrent
requests share one runtime call on a worker thread, and the event loop only
parses, validates and answers. Around the FastAPI app sit the access log and
metrics (``serve/observability.py``) and the API-key check (``serve/auth.py``).
Label configs are parsed off the event loop and cached (``serve/labels.py``);
error answers survive any input (``serve/errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from pipeline.core.errors import LabelConfigMismatch, ModelLoadError
from pipeline.labelstudio.labelconfig import LabelConfig, check_labels
from pipeline.labelstudio.regions import to_ls_prediction
from pipeline.runtime.inference import CRF_FILE, INFO_FILE, NerRuntime
from serve.auth import OPEN_PATHS, ApiKeyAuth
from serve.batching import Batched, MicroBatcher
from serve.errors import ShutdownAnswer, install_error_handlers, printable
from serve.labels import LabelConfigs, utf8_or_422
from serve.observability import AccessLog, Metrics
from serve.reload import ModelReloader

log = logging.getLogger(__name__)

API_KEY_ENV = "NER_API_KEY"


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; ``from_env`` reads them from ``NER_*`` variables."""

    model_dir: Path = Path("models/onnx")
    api_key: str | None = None
    max_texts: int = 256            # texts per request
    max_chars: int = 100_000        # characters per text (long texts are windowed)
    max_body_bytes: int = 10 << 20  # request body
    max_config_chars: int = 262_144  # a label config in /predict or /setup
    max_batch_size: int = 64        # texts per runtime call (micro-batch)
    max_wait_ms: float = 2.0        # how long a batch waits for company after its first request
    onnx_batch_size: int = 8        # texts per ONNX run inside a runtime call (sorted by length first)
    quantized: bool = False         # serve model.int8.onnx
    threads: int = 0                # ONNX Runtime intra-op threads (0: all cores but one, which HTTP keeps)

    ENV = {"model_dir": "NER_MODEL_DIR", "api_key": API_KEY_ENV, "max_texts": "NER_MAX_TEXTS",
           "max_chars": "NER_MAX_CHARS", "max_body_bytes": "NER_MAX_BODY_BYTES",
           "max_config_chars": "NER_MAX_CONFIG_CHARS",
           "max_batch_size": "NER_MAX_BATCH_SIZE", "max_wait_ms": "NER_MAX_WAIT_MS",
           "onnx_batch_size": "NER_ONNX_BATCH_SIZE",
           "quantized": "NER_QUANTIZED", "threads": "NER_THREADS"}

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_chars", "max_config_chars", "max_batch_size", "onnx_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({self.ENV[name]}) must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(cls.ENV[f.name])
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse(f.name, raw)
            except ValueError:
                raise ValueError(f"{cls.ENV[f.name]}={raw!r} is not a valid {f.name}") from None
        return cls(**values)

    def ort_threads(self) -> int:
        """ONNX Runtime's threads spin while they wait for work: leave the event loop a core of its own."""
        if self.threads > 0:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores - 1)


def _parse(name: str, raw: str) -> Any:
    if name == "model_dir":
        return Path(raw)
    if name == "api_key":
        return raw
    if name == "quantized":
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes")
    value = float(raw) if name == "max_wait_ms" else int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


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


class InFlight:
    """Counts the requests to the inference routes that are inside the app (for the batcher's ``arrivals``)."""

    def __init__(self, app: Any, paths: frozenset[str]) -> None:
        self.app, self.paths, self.count = app, paths, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        self.count += 1  # only the event loop thread touches it
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1


INFERENCE_PATHS = frozenset({"/v1/ner", "/predict"})


class NerService(FastAPI):
    """FastAPI with the access log, the key check and the in-flight count around its whole middleware stack."""

    metrics: Metrics
    api_key: str | None
    in_flight: InFlight | None = None

    def build_middleware_stack(self):  # noqa: ANN201 - Starlette's signature
        self.in_flight = InFlight(super().build_middleware_stack(), INFERENCE_PATHS)
        return AccessLog(ShutdownAnswer(ApiKeyAuth(self.in_flight, self.api_key)), self.metrics, self.router.routes)

    def arrivals(self) -> int:
        """Requests inside the app that the batcher has not been handed yet (read from the worker thread)."""
        batcher = self.state.batcher
        return (self.in_flight.count if self.in_flight else 0) - batcher.outstanding


def create_app(model_dir: str | Path | None = None, *, settings: Settings | None = None,
               **overrides: Any) -> NerService:
    """The service over one model folder. ``overrides`` are :class:`Settings` fields (``api_key=...``)."""
    settings = settings or Settings()
    if model_dir is not None:
        overrides["model_dir"] = Path(model_dir)
    if overrides:
        settings = Settings(**{**{f.name: getattr(settings, f.name) for f in fields(Settings)}, **overrides})

    def load(path: Path) -> NerRuntime:
        return load_runtime(path, settings)

    metrics = Metrics()
    runtime = load(settings.model_dir)
    metrics.set_model(runtime.model_version)
    batcher = MicroBatcher(runtime, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                           on_batch=metrics.observe_batch)
    reloader = ModelReloader(settings.model_dir, load, batcher, on_reload=metrics.observe_reload)
    configs: dict[str, LabelConfig] = {}
    parsed = LabelConfigs(settings.max_config_chars)
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        batcher.start()
        await batcher.submit(["warm up"])  # first ONNX run builds kernels; then we are ready
        sighup = _on_sighup(loop, lambda: loop.run_in_executor(None, reloader.check))
        state["ready"] = True
        log.info("serving %s from %s (micro-batches of up to %d texts, max wait %.1f ms, ONNX runs of %d)",
                 batcher.runtime.model_version, settings.model_dir, settings.max_batch_size, settings.max_wait_ms,
                 settings.onnx_batch_size)
        try:
            yield
        finally:
            state["ready"] = False
            if sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await asyncio.to_thread(batcher.close)

    app = NerService(title="NER service", version=runtime.model_version, lifespan=lifespan,
                     max_body_size=settings.max_body_bytes,
                     description="BERT-BiLSTM-CRF entities with character offsets; also a Label Studio ML "
                                 "backend. Every route except /health and /ready needs the API key when one "
                                 "is set (Bearer token, or basic auth with the key as password).")
    install_error_handlers(app)
    app.metrics, app.api_key = metrics, settings.api_key
    batcher.arrivals = app.arrivals
    app.state.batcher, app.state.reloader, app.state.settings = batcher, reloader, settings

    def check_texts(texts: list[str], names: list[str] | None = None) -> None:
        """Count and length limits (413) and valid Unicode (422); ``names[i]`` names text i in the error."""
        if len(texts) > settings.max_texts:
            raise HTTPException(status_code=413,
                                detail=f"{len(texts)} texts; at most {settings.max_texts} per request")
        for i, text in enumerate(texts):
            name = names[i] if names else f"text {i}"
            if len(text) > settings.max_chars:
                raise HTTPException(status_code=413,
                                    detail=f"{name} has {len(text)} characters; at most {settings.max_chars}")
            utf8_or_422(text, name)

    async def run(texts: list[str]) -> Batched:
        if not texts:
            return Batched([], batcher.runtime.model_version)
        return await batcher.submit(texts)

    @app.get("/health", response_model=HealthResponse, tags=["probes"])
    def health() -> dict[str, Any]:
        """Liveness (and Label Studio's health check): the process answers."""
        return {"status": "UP", "model_version": batcher.runtime.model_version}

    @app.get("/ready", response_model=HealthResponse, tags=["probes"],
             responses={503: {"description": "not ready: starting, stopping or the batch worker is gone"}})
    def ready() -> Any:
        """Readiness: the model is loaded and warmed up and the batch worker runs."""
        if state["ready"] and batcher.running:
            return {"status": "READY", "model_version": batcher.runtime.model_version}
        return JSONResponse({"status": "NOT_READY", "model_version": batcher.runtime.model_version}, 503)

    @app.get("/metrics", tags=["probes"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def prometheus_metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=ModelResponse, tags=["ner"])
    def model_info() -> dict[str, Any]:
        """The model being served: version, entity labels, tag scheme."""
        current = batcher.runtime
        return {"model_version": current.model_version, "labels": current.entity_types,
                "scheme": current.info.get("scheme"), "model_dir": str(settings.model_dir)}

    @app.post("/v1/ner", response_model=NerResponse, tags=["ner"],
              responses={413: {"description": "too many texts or a text too long"}})
    async def ner(body: NerRequest) -> NerResponse:
        """Entities with character offsets, labels and scores, one result per text in order."""
        check_texts(body.texts)
        out = await run(body.texts)
        return NerResponse(model_version=out.model_version,
                           results=[TextResult(**p.to_dict()) for p in out.predictions])

    @app.post("/setup", response_model=SetupResponse, tags=["label studio"],
              responses={413: {"description": "label config too long"}})
    def setup(body: SetupRequest) -> dict[str, str]:
        """Label Studio ML backend: reloads the model if its folder changed; checks the project's labels."""
        reloader.check()
        current = batcher.runtime
        if body.schema_:
            config = parsed.parse(body.schema_, "schema")  # a sync route: FastAPI runs it in a worker thread
            _labels_or_422(config, current.entity_types)
            configs[_project_key(body.project)] = config
        return {"model_version": current.model_version}

    @app.post("/predict", response_model=PredictResponse, tags=["label studio"],
              responses={413: {"description": "too many tasks, a text or the label config too long"}})
    async def predict(body: PredictRequest) -> dict[str, Any]:
        """Label Studio ML backend: one prediction per task, regions named after the label config."""
        if body.label_config:
            config = await run_in_threadpool(parsed.parse, body.label_config, "label_config")
        elif _project_key(body.project) in configs:
            config = configs[_project_key(body.project)]
        else:
            raise HTTPException(status_code=422, detail="no label_config in the request and no /setup for project")
        _labels_or_422(config, batcher.runtime.entity_types)
        texts, names = _task_texts(body.tasks, config.data_key)
        check_texts(texts, names)
        out = await run(texts)
        return {"results": [to_ls_prediction(p, config, out.model_version) for p in out.predictions]}

    @app.post("/webhook", tags=["label studio"])
    def webhook(body: dict[str, Any]) -> dict[str, str]:
        """Label Studio webhooks (TASKS_CREATED, PROJECT_UPDATED, ...): accepted and logged."""
        log.info("webhook %s", body.get("action"))
        return {"status": "ok"}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            if settings.api_key:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"}, "basic": {"type": "http", "scheme": "basic"}}
                for path, ops in schema["paths"].items():
                    for op in ops.values():
                        op["security"] = [] if path in OPEN_PATHS else [{"bearer": []}, {"basic": []}]
                        if path not in OPEN_PATHS:
                            op.setdefault("responses", {})["401"] = {"description": "missing or wrong API key"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _on_sighup(loop: asyncio.AbstractEventLoop, callback: Any) -> bool:
    """SIGHUP -> reload check (main thread of a Unix process only; elsewhere POST /setup does it)."""
    try:
        loop.add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return False
    return True


def _project_key(project: str | None) -> str:
    """Label Studio sends ``"<id>.<timestamp>"``; the id is the project."""
    return (project or "").split(".")[0]


def _task_texts(tasks: list[dict[str, Any]], data_key: str) -> tuple[list[str], list[str]]:
    """Each task's ``data[data_key]`` and its name for errors (``tasks[3] (id 17): data.text``); 422 if not a str."""
    texts, names = [], []
    for i, task in enumerate(tasks):
        name = f"tasks[{i}]" + (f" (id {printable(task['id'])})" if "id" in task else "") + f": data.{data_key}"
        data = task.get("data")
        text = data.get(data_key) if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise HTTPException(status_code=422, detail=f"{name} must be a string")
        texts.append(text)
        names.append(name)
    return texts, names


def _labels_or_422(config: LabelConfig, labels: list[str]) -> None:
    try:
        check_labels(labels, config)
    except LabelConfigMismatch as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


def load_runtime(model_dir: Path, settings: Settings) -> NerRuntime:
    """The model folder loaded and warmed up; any refusal is a :class:`ModelLoadError` naming the folder and why."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist ({Settings.ENV['model_dir']}, --model-dir); "
                             "run the export stage first")
    try:
        runtime = NerRuntime(model_dir, quantized=settings.quantized, threads=settings.ort_threads(),
                             batch_size=max(1, settings.onnx_batch_size))
        runtime.predict(["warm up"])  # the first ONNX run builds kernels, and shows a graph that does not run
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime, tokenizers and json each raise their own types
        raise ModelLoadError(f"cannot load the model in {model_dir}: {_load_problem(model_dir, exc)}") from exc
    return runtime


def _load_problem(model_dir: Path, exc: Exception) -> str:
    """What is wrong, in one line: a JSON file of the folder that does not parse, else the error's first line."""
    for path in sorted(model_dir.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as bad:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return f"{path.name} is not valid JSON ({str(bad).splitlines()[0]})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, KeyError):
        return f"{CRF_FILE} or {INFO_FILE} lacks the entry {text}"
    return f"{type(exc).__name__}: {text}"


def app_from_env() -> NerService:
    """Factory for ``uvicorn --factory serve.app:app_from_env`` (what ``python -m serve`` runs with workers).

    A model folder that does not load stops the process with one logged line (exit status 1), not a traceback.
    """
    try:
        return create_app(settings=Settings.from_env())
    except ModelLoadError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
