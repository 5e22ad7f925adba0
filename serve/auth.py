"""API-key check for every route except the probes, as a plain ASGI wrapper.

Accepted: ``Authorization: Bearer <key>`` (also ``Token <key>``) and HTTP basic
auth with the key as password (any user name), which is what Label Studio's
ML-backend "basic auth" settings send. Compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

#: Probes answer without a key: load balancers and orchestrators call them bare.
OPEN_PATHS = frozenset({"/health", "/ready"})
#: Pages a browser opens: a basic-auth challenge makes it ask for the key, then it sends it along.
BROWSER_PATHS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})


def presented_key(authorization: str) -> str:
    """The key in an ``Authorization`` header, or ``""``."""
    scheme, _, token = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme in ("bearer", "token"):
        return token.strip()
    if scheme == "basic":
        try:
            return base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def key_matches(presented: str, api_key: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), api_key.encode("utf-8"))


class ApiKeyAuth:
    """Answers 401 unless the request carries the key (or goes to an open path)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.api_key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS
                or key_matches(presented_key(Headers(scope=scope).get("authorization", "")), self.api_key)):
            await self.app(scope, receive, send)
            return
        challenge = b'Basic realm="ner-service"' if scope["path"] in BROWSER_PATHS else b'Bearer realm="ner-service"'
        body = json.dumps({"detail": "missing or wrong API key"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge)]})
        await send({"type": "http.response.body", "body": body})
