"""EventStreamResponse: the ASGI response that streams the APIs' server-sent events.

Starlette's StreamingResponse, under uvicorn's ASGI 2.3 (send does not raise after a disconnect), opens an
anyio task group with a second task listening for the disconnect, and cancel scopes, for every response.
This one streams in the request's own task and watches for the disconnect with one plain asyncio task,
which cancels the stream: closing the event generators then cancels the worker request.

A client that stays connected but stops reading blocks the server's writes once the socket buffers are full
(uvicorn waits for the transport to drain). A write that has waited `write_timeout_s` is the client's
fault: the stream is cancelled the same way (the worker request is aborted, its slot freed) and the server
closes the connection. One timer per response checks the write in progress; a write costs two clock reads.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from starlette.responses import Response

HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))
END = {"type": "http.response.body", "body": b"", "more_body": False}


class EventStreamResponse(Response):
    """200 `text/event-stream` with each event of `events` sent as soon as it is produced.

    `on_disconnect` is called once when the client goes away before the stream ends, `on_stall` once when a
    write waited `write_timeout_s` (both end the stream). A Response subclass only so that FastAPI passes it
    through as a response; it has no body or background task.
    """

    status_code = 200
    media_type = "text/event-stream"
    background = None

    def __init__(self, events: AsyncIterator[str], request_id: str, on_disconnect: Callable[[], None] | None = None,
                 write_timeout_s: float = 30.0, on_stall: Callable[[], None] | None = None):
        self.events = events
        self.raw_headers = [(b"x-request-id", request_id.encode()), *HEADERS]
        self.on_disconnect = on_disconnect
        self.write_timeout_s = write_timeout_s
        self.on_stall = on_stall
        self.disconnected = False
        self.stalled = False  # a write waited write_timeout_s: the client does not read
        self._finished = False
        self._writing_since: float | None = None  # loop time the write in progress began
        self._timer: asyncio.TimerHandle | None = None

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        streamer = asyncio.current_task()
        watcher = asyncio.create_task(self._watch(receive, streamer))
        self._check_writes_later(streamer)
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if not (self.disconnected or self.stalled):
                raise
            streamer.uncancel()  # our own cancel: the client left or stopped reading, the request is done
        finally:
            self._finished = True
            watcher.cancel()
            self._timer.cancel()
            await self.events.aclose()

    async def _stream(self, send) -> None:
        loop = asyncio.get_running_loop()
        async for event in self.events:
            self._writing_since = loop.time()
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            self._writing_since = None
        await send(END)

    def _check_writes_later(self, streamer: asyncio.Task) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.write_timeout_s / 2, self._check_writes, streamer, loop)

    def _check_writes(self, streamer: asyncio.Task, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel `streamer` when its write in progress has waited write_timeout_s; else look again later."""
        if self._finished:
            return
        since = self._writing_since
        if since is not None and loop.time() - since >= self.write_timeout_s:
            self.stalled = True
            streamer.cancel()
            if self.on_stall is not None:
                self.on_stall()
            return
        self._check_writes_later(streamer)

    async def _watch(self, receive, streamer: asyncio.Task) -> None:
        """Cancel `streamer` when the client disconnects while the events still flow."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._finished:
            self.disconnected = True
            streamer.cancel()
            if self.on_disconnect is not None:
                self.on_disconnect()
