"""FastRoutes: the API's POST endpoints served without FastAPI's per-request layers.

Routing a request through FastAPI (route matching over the included routers, dependency solving, two
exit stacks, the exception middleware and its send wrapper on every streamed event) cost about 0.3 ms of
router CPU per request, more than the endpoint's own work. The POST endpoints take only the Request and
answer errors by raising APIError, so a dict lookup and two except clauses do the same job.

The router app (router/app.py) puts this in front of FastAPI's whole middleware stack, so that a streamed
event passes no send wrapper between the endpoint and uvicorn; an unexpected exception in an endpoint
is therefore answered here, as FastAPI's 500 handler would: logged, and a 500 in the API's error format.

Everything else (other methods on these paths: 405, unknown paths: 404, probes, /metrics) goes on to
FastAPI, whose route table still lists these endpoints.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Iterable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from k2serve.router.errors import APIError, error_body

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[object]]


def post_endpoints(routers: Iterable[APIRouter]) -> dict[str, Endpoint]:
    """path -> endpoint of every POST route of `routers` (their endpoints return Responses)."""
    return {route.path: route.endpoint for router in routers for route in router.routes
            if isinstance(route, APIRoute) and "POST" in route.methods}


class FastRoutes:
    """ASGI middleware: a POST to one of `endpoints`' paths is answered here, anything else by `app`."""

    def __init__(self, app, endpoints: dict[str, Endpoint]):
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send) -> None:
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await endpoint(Request(scope, receive))
        except APIError as exc:
            response = JSONResponse(error_body(scope["path"], exc), status_code=exc.status)
        except ClientDisconnect:  # nginx's 499: sent into the closed connection, it reaches only the request metrics
            response = JSONResponse(error_body(scope["path"], APIError(499, "the client closed the request")), 499)
        except Exception:  # noqa: BLE001 - a bug in one request must not take the connection down unanswered
            log.exception("unhandled error on %s", scope["path"])
            response = JSONResponse(error_body(scope["path"], APIError(500, "internal server error")), status_code=500)
        try:
            await response(scope, receive, send)
        except Exception:  # a stream that broke after its status line: logged here, then the server closes it
            log.exception("unhandled error on %s", scope["path"])
            raise
