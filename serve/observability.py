"""Prometheus metrics (one registry per app) and a structured access log, as a plain ASGI wrapper.

The wrapper sits outside FastAPI's own middleware stack, so it sees the status
that really went out: 401 from the key check, 413 from the body limit, 422
from validation and the 500 of an unexpected error alike. Every label takes
its value from a fixed set, so no client can grow the metrics: requests are
counted by route template (``/v1/ner``), never by raw path (unknown paths
count as ``<unmatched>``); methods outside the standard ones count as
``other``; a status that is not a registered HTTP status counts by its class
(``5xx``). The access log keeps the method and path as sent.
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.batching import BatchStats
from serve.reload import ReloadResult

access_log = logging.getLogger("serve.access")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
UNMATCHED = "<unmatched>"
#: RFC 9110's methods plus PATCH: anything else a client makes up is labelled ``other``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
_KNOWN_STATUSES = frozenset(s.value for s in HTTPStatus)
JOB_DECISIONS = frozenset({"promoted", "rejected", "failed", "interrupted"})


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def status_label(status: int) -> str:
    """The status itself if it is a registered HTTP status, else its class (``4xx``), else ``other``."""
    if status in _KNOWN_STATUSES:
        return str(status)
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class Metrics:
    """The service's metrics in their own ``CollectorRegistry`` (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ner_http_requests", "HTTP requests by route template, method and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("ner_http_request_duration_seconds", "HTTP request latency, first byte in to "
                                 "last byte out", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_texts = Histogram("ner_batch_size_texts", "windows per runtime call (micro-batch size; a text is "
                                     "one window unless it is longer than the encoder takes)",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("ner_batch_size_requests", "requests grouped into one runtime call",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ner_batch_duration_seconds", "time of one runtime call",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.model_info = Gauge("ner_model_info", "the model being served (value 1)", ["model_version"],
                                registry=r)
        self.reloads = Counter("ner_model_reloads", "model reload attempts by result", ["result"], registry=r)
        self.jobs = Counter("ner_training_jobs", "finished training jobs by decision", ["decision"], registry=r)
        self.job_seconds = Histogram("ner_training_job_duration_seconds", "training job wall time, event to end",
                                     buckets=(30, 60, 120, 300, 600, 1200, 1800, 3600, 7200), registry=r)
        self.shared_core_calls = Counter("ner_shared_core_calls", "runtime calls run on the narrow ONNX Runtime "
                                         "session (half the threads) because the other lane was busy", registry=r)
        self.served_dev_f1 = Gauge("ner_served_model_dev_f1", "dev F1 of the served model on the last job's split",
                                   registry=r)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_texts.observe(stats.texts)
        self.batch_requests.observe(stats.requests)
        self.batch_seconds.observe(stats.seconds)

    def observe_shared_core_call(self) -> None:
        self.shared_core_calls.inc()

    def set_model(self, model_version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model_version=model_version).set(1)

    def observe_job(self, decision: str, seconds: float, served_dev_f1: float | None) -> None:
        self.jobs.labels(decision=decision if decision in JOB_DECISIONS else "other").inc()
        self.job_seconds.observe(seconds)
        if served_dev_f1 is not None:
            self.served_dev_f1.set(served_dev_f1)

    def observe_reload(self, result: ReloadResult) -> None:
        self.reloads.labels(result="ok" if result.reloaded else "error").inc()
        if result.reloaded:
            self.set_model(result.model_version)


def _flat(routes: Any) -> Any:
    """The routes, with those of included routers (FastAPI wraps each ``include_router`` in one entry) inline."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route


class AccessLog:
    """ASGI wrapper: one JSON log line and the request metrics for every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the router's route list: requests are labelled by template

    def route_of(self, scope: Scope) -> str:
        """The template of the route that answers (or that exists under another method: a 405), else UNMATCHED."""
        routed = scope.get("route")  # set by the router on the way in (FULL or PARTIAL match)
        if routed is not None:
            return getattr(routed, "path", UNMATCHED)
        partial = UNMATCHED  # the request never reached the router (a 401, a 413 on the body): match it here
        for route in _flat(self.routes):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", UNMATCHED)
            if match is Match.PARTIAL and partial == UNMATCHED:
                partial = getattr(route, "path", UNMATCHED)
        return partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app fails before it answers
        sent = 0

        async def send_and_record(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            seconds = time.perf_counter() - start
            route = self.route_of(scope)
            method = method_label(scope["method"])
            self.metrics.requests.labels(method=method, route=route, status=status_label(status)).inc()
            self.metrics.latency.labels(method=method, route=route).observe(seconds)
            self.log(scope, route, status, seconds, sent)

    @staticmethod
    def log(scope: Scope, route: str, status: int, seconds: float, sent: int) -> None:
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            access_log.info(json.dumps({
                "method": scope["method"], "path": scope["path"], "route": route, "status": status,
                "latency_ms": round(seconds * 1000, 2), "bytes": sent,
                "client": f"{client[0]}:{client[1]}" if client else None,
            }, ensure_ascii=False))
