"""The router's endpoints besides the APIs: liveness, readiness and the Prometheus series."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from k2serve.router.context import RouterContext
from k2serve.router.errors import APIError


async def health(ctx: RouterContext, request: Request) -> Response:
    """GET /health: the router process is up."""
    return JSONResponse({"status": "ok"})


async def ready(ctx: RouterContext, request: Request) -> Response:
    """GET /ready: at least one worker group answers its health check and the model info is known, and the
    router is not draining."""
    if ctx.drain.draining:
        return JSONResponse({"ready": False, "draining": True}, status_code=503)
    healthy = await ctx.pool.health()
    if any(healthy):
        try:
            await ctx.ensure_model_info()
        except APIError:
            healthy = []
    status = 200 if any(healthy) else 503
    return JSONResponse({"ready": status == 200, "healthy_workers": sum(healthy), "workers": len(healthy)},
                        status_code=status)


async def metrics(ctx: RouterContext, request: Request) -> Response:
    """GET /metrics: the router's Prometheus series (served only when the app has metrics)."""
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)
