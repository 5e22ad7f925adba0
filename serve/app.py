"""The service: a plain NER API and the Label Studio ML-backend protocol over the shared inference runtime.

``create_app`` builds the :class:`serve.state.ServiceState` (model, micro-batcher, reloader, label configs) and
mounts the routes of ``serve/routes/``. Inference goes through the micro-batcher (``serve/batching.py``):
concurrent requests share one runtime call on a worker thread, and the event loop only parses, validates and
answers. Around the FastAPI app sit the access log and metrics (``serve/observability.py``) and the API-key
check (``serve/auth.py``); error answers survive any input (``serve/errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from pipeline.core.errors import PipelineError
from serve.auth import OPEN_PATHS, ApiKeyAuth
from serve.errors import ShutdownAnswer, install_error_handlers
from serve.observability import AccessLog, Metrics
from serve.routes import labelstudio, ner, probes, training
from serve.settings import Settings
from serve.state import ServiceState

log = logging.getLogger(__name__)

DESCRIPTION = ("BERT-BiLSTM-CRF entities with character offsets; also a Label Studio ML backend. Every route "
               "except /health and /ready needs the API key when one is set (Bearer token, or basic auth with "
               "the key as password).")


class InFlight:
    """Counts the requests to the inference routes that are inside the app (for the batcher's ``arrivals``);
    ``on_quiet`` runs when the last one has been answered (the batcher may then give memory back)."""

    def __init__(self, app: Any, paths: frozenset[str], on_quiet: Any = None) -> None:
        self.app, self.paths, self.count, self.on_quiet = app, paths, 0, on_quiet

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        self.count += 1  # only the event loop thread touches it
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1
            if self.count == 0 and self.on_quiet is not None:
                self.on_quiet()


INFERENCE_PATHS = frozenset({"/v1/ner", "/predict"})


class BodyLimit:
    """ASGI middleware: the request body limit, by path. ``/predict``'s is larger: Label Studio's "Retrieve
    predictions" posts a whole selection of full task dicts in one call."""

    def __init__(self, app: Any, default: int, by_path: dict[str, int]) -> None:
        self.default = RequestBodyLimitMiddleware(app, default)
        self.by_path = {path: RequestBodyLimitMiddleware(app, limit) for path, limit in by_path.items()}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.by_path.get(scope.get("path", ""), self.default)(scope, receive, send)


class NerService(FastAPI):
    """FastAPI with the access log, the key check and the in-flight count around its whole middleware stack."""

    metrics: Metrics
    api_key: str | None
    body_limits: tuple[int, dict[str, int]] = (10 << 20, {})  # default, by path
    in_flight: InFlight | None = None

    def build_middleware_stack(self):  # noqa: ANN201 - Starlette's signature
        self.in_flight = InFlight(super().build_middleware_stack(), INFERENCE_PATHS,
                                  on_quiet=lambda: self.state.batcher.quiet())
        limited = BodyLimit(self.in_flight, *self.body_limits)
        return AccessLog(ShutdownAnswer(ApiKeyAuth(limited, self.api_key)), self.metrics, self.router.routes)

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
    settings = dataclasses.replace(settings, **overrides)
    state = ServiceState(settings)  # loads and warms up the model: a folder that does not load stops here
    app = NerService(title="NER service", version=state.runtime.model_version, lifespan=_lifespan,
                     description=DESCRIPTION)  # body limits: BodyLimit, by path
    install_error_handlers(app)
    app.metrics, app.api_key = state.metrics, settings.api_key
    app.body_limits = (settings.max_body_bytes, {"/predict": settings.max_predict_body_bytes})
    state.batcher.arrivals = app.arrivals
    app.state.service = state
    app.state.batcher, app.state.reloader, app.state.settings = state.batcher, state.reloader, settings
    for module in (probes, ner, labelstudio, training):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app, settings.api_key)  # type: ignore[method-assign]
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the batch worker, warm it up, listen for SIGHUP; on the way out, stop taking work and drain."""
    state: ServiceState = app.state.service
    loop = asyncio.get_running_loop()
    state.batcher.start()
    await state.batcher.submit(["warm up"])  # first ONNX run builds kernels; then we are ready
    # Everything loaded so far (the app, the model, the libraries) lives as long as the service: out of the
    # collector's sight, a full collection stops every thread for ~5 ms instead of ~100 (README, Serving)
    gc.freeze()
    sighup = _on_sighup(loop, lambda: loop.run_in_executor(None, state.reloader.check))
    watcher = asyncio.create_task(_watch_model_dir(state)) if state.settings.reload_interval_s > 0 else None
    state.ready = True
    s = state.settings
    log.info("serving %s from %s (micro-batches of up to %d texts, max wait %.1f ms, ONNX runs of %d)",
             state.runtime.model_version, s.model_dir, s.max_batch_size, s.max_wait_ms, s.onnx_batch_size)
    try:
        yield
    finally:
        state.ready = False
        if watcher is not None:
            watcher.cancel()
        if sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        if state.training is not None:
            await asyncio.to_thread(state.training.close)
        await asyncio.to_thread(state.batcher.close)


async def _watch_model_dir(state: ServiceState) -> None:
    """Every ``reload_interval_s``, a cheap look (names, sizes, times) at the model folder; a change reloads.

    So ``python -m pipeline promote VERSION`` (a rollback) or a new export is served without a SIGHUP.
    """
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(state.settings.reload_interval_s)
        if state.reloader.worth_a_check():
            await loop.run_in_executor(None, state.reloader.check)


def _openapi(app: FastAPI, api_key: str | None) -> dict[str, Any]:
    """The OpenAPI schema, with the key's security schemes on every route that needs it."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if api_key:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}, "basic": {"type": "http", "scheme": "basic"}}
            for path, ops in schema["paths"].items():
                for op in ops.values():
                    op["security"] = [] if path in OPEN_PATHS else [{"bearer": []}, {"basic": []}]
                    if path not in OPEN_PATHS:
                        op.setdefault("responses", {})["401"] = {"description": "missing or wrong API key"}
        app.openapi_schema = schema
    return app.openapi_schema


def _on_sighup(loop: asyncio.AbstractEventLoop, callback: Any) -> bool:
    """SIGHUP -> reload check (main thread of a Unix process only; elsewhere POST /setup does it)."""
    try:
        loop.add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return False
    return True


def app_from_env() -> NerService:
    """Factory for ``uvicorn --factory serve.app:app_from_env`` (what ``python -m serve`` runs with workers).

    A model folder that does not load stops the process with one logged line (exit status 1), not a traceback.
    """
    try:
        return create_app(settings=Settings.from_env())
    except PipelineError as exc:  # a model folder that does not load, a params file that does not parse
        log.error("%s", exc)
        raise SystemExit(1) from None
