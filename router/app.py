"""create_app: the router's FastAPI application, from the route table to each request's handler.

A request goes through, in order:

1. the middleware added with `add_middleware`, outermost first: anything added after create_app, then
   the router's request metrics (when the app has metrics), the drain (router/drain.py: 503 while the
   router shuts down) and the API key check (when one is set);
2. ErrorResponses (api/error_responses.py): an exception becomes the answer of the app's exception
   handlers, in the API's own error format;
3. FastAPI's router over ROUTES: an unknown path is a 404, a wrong method a 405;
4. the route's Endpoint, which calls the handler with the app's RouterContext and sends its response.

The app's RouterContext is on `app.state.ctx`; there is no module-level state.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from k2serve.router.api import anthropic_api, openai_api, probes
from k2serve.router.api.error_responses import ERROR_HANDLERS, ErrorResponses
from k2serve.router.api.middleware import AuthMiddleware, DrainMiddleware, RequestMetricsMiddleware
from k2serve.router.api.openapi import openapi_document
from k2serve.router.api.protocol import ChatCompletionRequest, CompletionRequest, MessagesRequest
from k2serve.router.config import RouterConfig
from k2serve.router.context import RouterContext
from k2serve.router.metrics import RouterMetrics
from k2serve.router.pool.group_pool import WorkerPool
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.text.tokenizer import K2Tokenizer

Handler = Callable[[RouterContext, Request], Awaitable[Response]]

# path, method, handler: every endpoint of the router.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("/v1/chat/completions", "POST", openai_api.chat_completions),
    ("/v1/completions", "POST", openai_api.completions),
    ("/v1/models", "GET", openai_api.list_models),
    ("/v1/messages", "POST", anthropic_api.messages),
    ("/health", "GET", probes.health),
    ("/ready", "GET", probes.ready),
    ("/metrics", "GET", probes.metrics),
)
API_PATHS = frozenset(path for path, _, _ in ROUTES if path.startswith("/v1/"))
# The model that validates each route's request body (its schema is in GET /openapi.json).
REQUEST_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
                  "/v1/messages": MessagesRequest}


def create_app(config: RouterConfig, pool: WorkerPool, tokenizer: K2Tokenizer, template: ChatTemplate,
               metrics: RouterMetrics | None = None) -> "RouterApp":
    """The router app over `pool`; without `metrics` it records none and serves no /metrics."""
    ctx = RouterContext(config, pool, tokenizer, template, metrics)
    served = [(path, method, handler) for path, method, handler in ROUTES
              if metrics is not None or handler is not probes.metrics]
    routes = [Route(path, Endpoint(handler, ctx), methods=[method]) for path, method, handler in served]
    app = RouterApp(routes=routes, title="k2serve router", version=package_version(), docs_url="/docs",
                    redoc_url=None, openapi_url="/openapi.json",
                    telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.ctx = ctx
    app.route_table = served
    for exc_class, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(exc_class, handler)
    if config.api_key:
        app.add_middleware(AuthMiddleware, api_key=config.api_key)
    app.add_middleware(DrainMiddleware, drain=ctx.drain)
    if metrics is not None:
        app.add_middleware(RequestMetricsMiddleware, metrics=metrics, endpoints=API_PATHS)
    return app


def package_version() -> str:
    try:
        return version("k2serve")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0"


class Endpoint:
    """The ASGI app of one route: `handler(ctx, request)` returns the response, which is sent as it is.

    A handler answers a client mistake by raising APIError; ErrorResponses turns it into the response.
    """

    def __init__(self, handler: Handler, ctx: RouterContext):
        self.handler = handler
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(self.ctx, Request(scope, receive))
        await response(scope, receive, send)


class RouterApp(FastAPI):
    """FastAPI whose per-request stack is the app's middleware around ErrorResponses around the routes.

    FastAPI's own stack also puts ServerErrorMiddleware, its telemetry and body-limit layers,
    ExceptionMiddleware and an AsyncExitStack around every request, and two of them wrap `send` in a
    coroutine that each streamed event then passes through. The router needs none of them: ErrorResponses
    answers exceptions with the app's exception handlers, request bodies are capped where they are read
    (api/protocol.read_request), telemetry is off (the router reports through Prometheus), and no route
    takes uploaded files or dependencies. An exception raised by a middleware itself (outside
    ErrorResponses) reaches the server, which answers 500. It serves its OpenAPI document (GET /openapi.json,
    /docs) from `route_table`, the routes create_app gave it, with their real request models.
    """

    route_table: list[tuple[str, str, Handler]]  # (path, method, handler), as in ROUTES

    def openapi(self) -> dict:
        """The OpenAPI document of the route table with the real request models (api/openapi.py)."""
        if not self.openapi_schema:
            self.openapi_schema = openapi_document(self.title, self.version, self.route_table, REQUEST_BODIES)
        return self.openapi_schema

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = ErrorResponses(self.router, self.exception_handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app
