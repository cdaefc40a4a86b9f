"""create_app: the router's FastAPI application (OpenAI + Anthropic APIs, probes, auth, limits).

State lives on `app.state.ctx` (a RouterContext); there are no module-level globals. The gRPC port
of the workers is for workers and routers only; clients reach the model through this app.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2serve.router.config import RouterConfig
from k2serve.router.text.detokenizer import IncrementalDetokenizer
from k2serve.router.errors import APIError, error_body, validation_message
from k2serve.router.api.fast_routes import FastRoutes, post_endpoints
from k2serve.router.generation.choice import Backend, RoundRobin, RouterContext

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})


def _default_detokenizer(tokenizer):
    # Skipping special tokens drops [EOS] / <|im_end|> but keeps K2's tool-call markers (special: false).
    return IncrementalDetokenizer(tokenizer, skip_special_tokens=True)


def create_app(config: RouterConfig, backends: Sequence[Backend] | Any, tokenizer: Any, template: Any,
               detokenizer_factory=None, metrics: Any = None) -> FastAPI:
    """Build the router app.

    `backends`: a list of worker backends (WorkerClient or fakes; round-robin) or any object with
    `pick(prompt_ids) -> backend` and `backends` (e.g. the balancer). `tokenizer`: K2Tokenizer;
    `template`: ChatTemplate; `detokenizer_factory(tokenizer)` defaults to IncrementalDetokenizer.
    """
    from k2serve.router.api.anthropic_api import routes as anthropic_routes
    from k2serve.router.api.openai_api import routes as openai_routes

    picker = backends if hasattr(backends, "pick") else RoundRobin(list(backends))
    endpoints = post_endpoints([openai_routes, anthropic_routes])

    def front(fastapi_stack):  # inside out: FastRoutes, auth, then the request metrics (they count 401s too)
        inner = FastRoutes(fastapi_stack, endpoints)
        inner = _AuthMiddleware(inner, config.api_key.encode()) if config.api_key else inner
        if metrics is None:
            return inner
        api_paths = frozenset(route.path for r in (openai_routes, anthropic_routes) for route in r.routes)
        return _RequestMetricsMiddleware(inner, metrics, api_paths)

    app = RouterApp(front, title="k2serve router", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = RouterContext(config=config, picker=picker, tokenizer=tokenizer, template=template,
                                  detokenizer_factory=detokenizer_factory or _default_detokenizer, metrics=metrics)
    _install_error_handlers(app)
    app.include_router(openai_routes)
    app.include_router(anthropic_routes)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/ready", ready, methods=["GET"])
    if metrics is not None and hasattr(metrics, "render"):
        app.add_api_route("/metrics", _metrics_endpoint(metrics), methods=["GET"])
    return app


async def health() -> dict:
    """Liveness: the router process is up."""
    return {"status": "ok"}


async def ready(request: Request):
    """Readiness: at least one worker answers its health check and the model info is known."""
    ctx: RouterContext = request.app.state.ctx
    healthy = [await b.health() for b in ctx.picker.backends]
    if any(healthy):
        try:
            await ctx.ensure_model_info()
        except APIError:
            healthy = []
    status = 200 if any(healthy) else 503
    return JSONResponse({"ready": status == 200, "healthy_workers": sum(healthy), "workers": len(healthy)},
                        status_code=status)


def _metrics_endpoint(metrics):
    from fastapi.responses import Response

    async def endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)
    return endpoint


def presented_key(request: Request) -> str | None:
    """The API key a client sent: `Authorization: Bearer KEY` or Anthropic's `x-api-key`."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key")


class RouterApp(FastAPI):
    """FastAPI with the router's own front in front of FastAPI's middleware stack.

    `front(stack)` wraps the stack FastAPI builds (its error, telemetry, body-limit and exception
    middleware, then the routes) in the router's plain ASGI layers: request metrics, auth and FastRoutes.
    A streamed event of the API's POST endpoints then goes from the endpoint to uvicorn through no
    send wrapper (FastAPI's error middleware wraps send for every event).

    HTTP requests also skip FastAPI's per-request check for an OpenTelemetry provider (about 0.1 ms of
    router CPU per request here): the router observes itself with Prometheus (router/metrics.py), and
    FastAPI's own OpenTelemetry spans are not produced. A layer every request must pass (CORS, say)
    belongs in `front`: one added with `add_middleware` sits inside FastRoutes and sees only what
    FastAPI answers.
    """

    def __init__(self, front: Callable[[Any], Any], **kwargs: Any):
        super().__init__(**kwargs)
        self._front = front

    def build_middleware_stack(self):
        return self._front(super().build_middleware_stack())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan and websockets as FastAPI runs them
            await super().__call__(scope, receive, send)
            return
        if self.root_path:
            scope["root_path"] = self.root_path
        await Starlette.__call__(self, scope, receive, send)


# Plain ASGI middleware: Starlette's BaseHTTPMiddleware (@app.middleware("http")) re-streams every
# response body through a task and a memory channel, which delays each streamed token.


class _AuthMiddleware:
    """401 in the API's error format unless the request presents the API key (probes are open)."""

    def __init__(self, app, expected: bytes):
        self.app = app
        self.expected = expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            key = presented_key(Request(scope))
            if key is None or not hmac.compare_digest(key.encode(), self.expected):
                err = APIError(401, "Invalid or missing API key", code="invalid_api_key")
                await JSONResponse(error_body(scope["path"], err), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _RequestMetricsMiddleware:
    """Count API requests by endpoint and status; duration from arrival to the last byte sent.

    The endpoint label is one of `endpoints` or "other": paths come from clients, and a label per path
    would let anyone grow the series without bound.
    """

    def __init__(self, app, metrics, endpoints: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        path = path if path in self.endpoints else "other"
        start = time.monotonic()
        self.metrics.request_started(path)
        status = 500

        def send_status(message):  # a plain function handing back send's awaitable: no frame per event
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request_finished(path, status, time.monotonic() - start)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(request.url.path, exc), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = APIError(400, validation_message(exc.errors()))
        return JSONResponse(error_body(request.url.path, err), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail))
        return JSONResponse(error_body(request.url.path, err), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, "internal server error")
        return JSONResponse(error_body(request.url.path, err), status_code=500)
