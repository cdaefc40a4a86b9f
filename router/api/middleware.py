"""The router's own ASGI middleware: the request metrics, the drain and the API key check.

create_app adds them with `add_middleware`, the request metrics outermost (they count 401s and the 503s of
a drain too). Both are
plain ASGI classes: Starlette's BaseHTTPMiddleware (`@app.middleware("http")`) re-streams every response
body through a task and a memory channel, which would delay each streamed token.
"""

from __future__ import annotations

import hmac
import time
from typing import Awaitable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from k2serve.router.drain import Drain
from k2serve.router.errors import APIError, error_body
from k2serve.router.metrics import RouterMetrics

OPEN_PATHS = frozenset({"/health", "/ready"})


def presented_key(request: Request) -> str | None:
    """The API key a client sent: `Authorization: Bearer KEY` or Anthropic's `x-api-key`."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


class AuthMiddleware:
    """401 in the API's error format unless the request presents the API key (the probes are open)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            key = presented_key(Request(scope))
            if key is None or not hmac.compare_digest(key.encode(), self.expected):
                err = APIError(401, "Invalid or missing API key", code="invalid_api_key")
                await JSONResponse(error_body(scope["path"], err), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class DrainMiddleware:
    """Counts the API requests in flight for the drain; while draining, a new API request is answered 503
    (retry: another replica serves it) and every response closes its connection."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self._while_draining(scope, receive, send)
            return
        is_api = scope["path"].startswith("/v1/")
        self.drain.in_flight += is_api
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= is_api

    async def _while_draining(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith("/v1/"):
            err = APIError(503, "the router is shutting down; retry the request")
            response = JSONResponse(error_body(scope["path"], err), status_code=503, headers={"connection": "close"})
            await response(scope, receive, send)
            return

        def closing(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            return send(message)
        await self.app(scope, receive, closing)


class RequestMetricsMiddleware:
    """Count API requests (paths under /v1/) by endpoint and status; duration from arrival to the last byte.

    The endpoint label is one of `endpoints` or "other": paths come from clients, and a label per path
    would let anyone grow the series without bound.
    """

    def __init__(self, app: ASGIApp, metrics: RouterMetrics, endpoints: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        path = path if path in self.endpoints else "other"
        start = time.monotonic()
        self.metrics.request_started(path)
        status = 500

        def send_status(message: Message) -> Awaitable[None]:  # a plain function: no frame per event
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request_finished(path, status, time.monotonic() - start)
