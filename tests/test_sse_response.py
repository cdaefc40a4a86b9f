"""EventStreamResponse at the ASGI level: events as sent, the end of the body, a disconnect mid-stream."""

from __future__ import annotations

import asyncio

from k2serve.router.api.sse_response import EventStreamResponse


class FakeClient:
    """ASGI receive/send of a client that has sent its body and may disconnect later."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)


async def events(n: int | None, log: list[str], pause: asyncio.Event | None = None):
    """`n` events (None: without end), then waits on `pause` forever when given; logs its closing."""
    try:
        i = 0
        while n is None or i < n:
            yield f"data: {i}\n\n"
            i += 1
            if pause is not None and i == 2:
                await asyncio.Event().wait()
    finally:
        log.append("closed")


def test_streams_each_event_then_ends_the_body():
    client, log, disconnects = FakeClient(), [], []

    async def run():
        response = EventStreamResponse(events(3, log), "rid-1", on_disconnect=lambda: disconnects.append(1))
        await response({"type": "http"}, client.receive, client.send)

    asyncio.run(run())
    start, *bodies = client.sent
    assert start["status"] == 200
    assert dict(start["headers"]) == {b"x-request-id": b"rid-1", b"cache-control": b"no-cache",
                                      b"content-type": b"text/event-stream; charset=utf-8"}
    assert [m["body"] for m in bodies] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert [m["more_body"] for m in bodies] == [True, True, True, False]
    assert log == ["closed"] and disconnects == []


def test_disconnect_mid_stream_closes_the_events():
    """The stream waits for a token that never comes; the client leaves: the events are closed (which
    cancels the worker request), the response returns normally and the disconnect is reported once."""
    client, log, disconnects = FakeClient(), [], []

    async def run():
        response = EventStreamResponse(events(None, log, pause=asyncio.Event()), "rid-2",
                                       on_disconnect=lambda: disconnects.append(1))
        task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
        while len(client.sent) < 3:
            await asyncio.sleep(0)
        client.gone.set()
        await asyncio.wait_for(task, 5)
        return response, task

    response, task = asyncio.run(run())
    assert not task.cancelled() and response.disconnected
    assert [m.get("body") for m in client.sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n"]
    assert log == ["closed"] and disconnects == [1]


def test_cancelling_the_request_task_still_propagates():
    """A cancel that is not the client's disconnect (server shutdown) is not swallowed."""
    client, log = FakeClient(), []

    async def run():
        response = EventStreamResponse(events(None, log, pause=asyncio.Event()), "rid-3")
        task = asyncio.create_task(response({"type": "http"}, client.receive, client.send))
        while len(client.sent) < 3:
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task

    assert asyncio.run(run()).cancelled()
    assert log == ["closed"]


def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout():
    """The client stays connected but takes no more writes: after write_timeout_s the events are closed
    (which cancels the worker request), the response returns and the stall is reported once."""
    log, stalls = [], []
    sent: list[dict] = []
    blocked = asyncio.Event()

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) == 3:  # the socket buffers are full: this write never completes
            blocked.set()
            await asyncio.Event().wait()

    async def run():
        client = FakeClient()
        response = EventStreamResponse(events(None, log), "rid-3", write_timeout_s=0.2,
                                       on_stall=lambda: stalls.append(1))
        task = asyncio.create_task(response({"type": "http"}, client.receive, send))
        await blocked.wait()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(task, 5)
        return response, task, asyncio.get_running_loop().time() - started

    response, task, waited = asyncio.run(run())
    assert not task.cancelled() and response.stalled and not response.disconnected
    assert 0.2 <= waited < 2 and log == ["closed"] and stalls == [1]
    assert sent[-1]["more_body"]  # the response is left unfinished: the server closes the connection


def test_a_slow_but_reading_client_is_not_cut_off():
    log, stalls = [], []

    async def send(message: dict) -> None:
        await asyncio.sleep(0.03)  # each write takes a while, none takes write_timeout_s

    async def run():
        response = EventStreamResponse(events(12, log), "rid-4", write_timeout_s=0.1,
                                       on_stall=lambda: stalls.append(1))
        await asyncio.wait_for(response({"type": "http"}, FakeClient().receive, send), 5)
        return response

    response = asyncio.run(run())
    assert not response.stalled and log == ["closed"] and stalls == []
