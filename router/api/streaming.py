"""A request's choices over HTTP: priming a stream, watching for the client to leave, the SSE response."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request
from starlette.requests import ClientDisconnect

from k2serve.router.api.sse import sse
from k2serve.router.api.sse_response import EventStreamResponse
from k2serve.router.context import RouterContext
from k2serve.router.errors import APIError, openai_error_body
from k2serve.router.generation.events import Event


async def primed(stream: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """Start a choice now so that a worker refusal becomes the HTTP status, not an in-stream error."""
    first = await stream.__anext__()

    async def rest() -> AsyncIterator[Event]:
        yield first
        async for event in stream:
            yield event
    return rest()


async def prime_first(ctx: RouterContext, request: Request,
                      streams: list[AsyncIterator[Event]]) -> list[AsyncIterator[Event]]:
    """Prime the first choice, so that a worker refusal becomes the HTTP status; on failure, or when the
    client leaves meanwhile, close them all (cancelling their worker requests).

    Only the first: a primed choice holds its admission slot until the response consumes it, so priming
    n choices in turn deadlocks once the slots run out (each request holding some, waiting for more).
    The other choices start when the response streams; a refusal of one of them is an error event."""
    try:
        first = await while_connected(ctx, request, primed(streams[0]))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    return [first, *streams[1:]]


T = TypeVar("T")


async def while_connected(ctx: RouterContext, request: Request, work: Awaitable[T]) -> T:
    """`work` (collecting a non-streamed answer, or priming a stream) unless the client leaves first: then
    `work` is cancelled, which closes its choices and so cancels their worker requests (also one still
    queued for admission), the disconnect is counted, and ClientDisconnect is raised (the router answers
    it with 499, which nobody reads)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the caller itself is cancelled
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled():
        return task.result()
    if ctx.metrics is not None:
        ctx.metrics.client_disconnect(request.scope["path"])
    raise ClientDisconnect()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body was read before: what comes now is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def streaming_response(ctx: RouterContext, request: Request, body: AsyncIterator[str], rid: str) -> EventStreamResponse:
    """The SSE response; a client that leaves mid-stream, or stops reading for stream_write_timeout_s, is
    counted in the metrics (and its worker request cancelled)."""
    metrics, path = ctx.metrics, request.scope["path"]
    on_disconnect = (lambda: metrics.client_disconnect(path)) if metrics is not None else None
    on_stall = (lambda: metrics.cancelled("slow_client")) if metrics is not None else None
    return EventStreamResponse(body, rid, on_disconnect, ctx.config.stream_write_timeout_s, on_stall)


async def sse_with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error after the stream began becomes an OpenAI error event (the status line was sent)."""
    try:
        async for chunk in events:
            yield chunk
    except APIError as exc:
        yield sse(openai_error_body(exc))
