"""EventStreamResponse: the ASGI response that streams the APIs' server-sent events.

Starlette's StreamingResponse, under uvicorn's ASGI 2.3 (send does not raise after a disconnect), opens an
anyio task group with a second task listening for the disconnect, and cancel scopes, for every response.
This one streams in the request's own task and watches for the disconnect with one plain asyncio task,
which cancels the stream: closing the event generators then cancels the worker request.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from starlette.responses import Response

HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))
END = {"type": "http.response.body", "body": b"", "more_body": False}


class EventStreamResponse(Response):
    """200 `text/event-stream` with each event of `events` sent as soon as it is produced.

    `on_disconnect` is called once when the client goes away before the stream ends. A Response subclass
    only so that FastAPI passes it through as a response; it has no body or background task.
    """

    status_code = 200
    media_type = "text/event-stream"
    background = None

    def __init__(self, events: AsyncIterator[str], request_id: str, on_disconnect: Callable[[], None] | None = None):
        self.events = events
        self.raw_headers = [(b"x-request-id", request_id.encode()), *HEADERS]
        self.on_disconnect = on_disconnect
        self.disconnected = False
        self._finished = False

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.create_task(self._watch(receive, asyncio.current_task()))
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if not self.disconnected:
                raise
            asyncio.current_task().uncancel()  # our own cancel: the client left, the request is done
        finally:
            self._finished = True
            watcher.cancel()
            await self.events.aclose()

    async def _stream(self, send) -> None:
        async for event in self.events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send(END)

    async def _watch(self, receive, streamer: asyncio.Task) -> None:
        """Cancel `streamer` when the client disconnects while the events still flow."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._finished:
            self.disconnected = True
            streamer.cancel()
            if self.on_disconnect is not None:
                self.on_disconnect()
