"""Error answers that cannot fail themselves, and a clean answer to requests cut short by shutdown.

FastAPI's default handlers echo the offending input (validation errors) or a
detail that may quote it; a lone surrogate there (valid JSON, ``"\\ud800"``,
but not encodable as UTF-8) made the error answer itself fail with a 500.
Here such text goes out escaped, as ASCII JSON, and the answer stays a 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class SafeJSONResponse(JSONResponse):
    """UTF-8 JSON as usual; content with a lone surrogate goes out as ASCII JSON (``\\ud800``) instead of failing."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
    headers = getattr(exc, "headers", None)
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=headers)
    return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


async def validation_error(_: Request, exc: RequestValidationError) -> Response:
    return SafeJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]


def printable(value: object) -> str:
    """``str(value)`` with anything that is not encodable (lone surrogates) backslash-escaped, at most 100 chars."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 100 else text[:97] + "..."


SHUTTING_DOWN = json.dumps({"detail": "the service is shutting down; send the request again"}).encode()


class ShutdownAnswer:
    """ASGI wrapper: a request that uvicorn cancels at the end of its graceful shutdown gets a 503, not a 500.

    Uvicorn cancels the requests still running when ``timeout_graceful_shutdown`` is up (a client that never
    finishes its body, a batch that does not end); unhandled, the cancellation is logged as a traceback and
    answered with a 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_track(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_track)
        except asyncio.CancelledError:
            log.warning("%s %s cut short by the shutdown", scope["method"], scope["path"])
            if not started:
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                        (b"content-length", str(len(SHUTTING_DOWN)).encode())]})
                await send({"type": "http.response.body", "body": SHUTTING_DOWN})
