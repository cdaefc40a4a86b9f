"""WorkerSession: the worker's end of one Session stream, many requests multiplexed over one gRPC call.

A router opens one session per worker group and sends generate/abort requests on it. Each request runs
as its own task that fills its responses, tagged with the request id, into the session's current batch;
one writer sends the batch whenever it is non-empty. Responses ready together (all of an engine step's
outputs are delivered in one event-loop pass) therefore leave in one message, and while a write waits
on the network the next batch grows: the number of gRPC messages follows the step rate, not the token
rate. A full batch makes the request tasks wait for the write, so a slow router gets merged outputs
from the engine instead of an ever larger message.

Cancelling the session (the router went away) cancels every request task, and each task's cleanup
aborts its request in the engine, freeing its blocks. `drain()` (the worker is stopping) answers new
requests with a 503, which a router retries on another group, and ends the session once the requests
in flight are done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

from k2serve.v1 import worker_pb2
from k2serve.worker.responses import ResponseFactory, fill_error

log = logging.getLogger(__name__)

ResponseStream = Callable[[worker_pb2.GenerateRequest, ResponseFactory], AsyncIterator[Any]]
MAX_BATCH_RESPONSES = 4096


class WorkerSession:
    """Runs one Session call. `responses(request, new)` streams one request's responses, each filled into
    `new()`, and aborts the request in the engine when it is cancelled before the end."""

    def __init__(self, responses: ResponseStream):
        self._responses = responses
        self._batch = worker_pb2.SessionResponse()
        self._ready = asyncio.Event()
        self._sent = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._reading = True
        self._draining = False

    async def run(self, request_iterator: AsyncIterator[worker_pb2.SessionRequest], context: Any) -> None:
        """Serve until the router half-closes (or the worker drains) and every request is done, or until
        the call is cancelled."""
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while (self._reading and not self._draining) or self._tasks or len(self._batch.responses):
                await self._ready.wait()
                self._ready.clear()
                if len(self._batch.responses):
                    batch, self._batch = self._batch, worker_pb2.SessionResponse()
                    await context.write(batch)
                    sent, self._sent = self._sent, asyncio.Event()
                    sent.set()
        finally:
            reader.cancel()
            for task in list(self._tasks.values()):
                task.cancel()  # each request's cleanup aborts it in the engine

    def drain(self) -> None:
        """Refuse new requests (503) and end the session when the ones in flight are done."""
        self._draining = True
        self._ready.set()

    async def _read(self, request_iterator: AsyncIterator[worker_pb2.SessionRequest]) -> None:
        try:
            async for request in request_iterator:
                for generate in request.generate:
                    self._start(generate)
                for abort in request.abort:
                    self._stop(abort.request_id)
        except Exception:  # noqa: BLE001 - logged; the session ends once its requests are done
            log.exception("reading a session's requests failed")
        finally:
            self._reading = False
            self._ready.set()

    def _start(self, request: worker_pb2.GenerateRequest) -> None:
        rid = request.request_id
        if self._draining:
            fill_error(self._new(rid), "the worker is shutting down", 503)
        elif rid in self._tasks:
            fill_error(self._new(rid), f"request id {rid!r} is already in use", 400)
        else:
            self._tasks[rid] = asyncio.create_task(self._serve(rid, request))

    def _stop(self, rid: str) -> None:
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    async def _serve(self, rid: str, request: worker_pb2.GenerateRequest) -> None:
        try:
            async for _ in self._responses(request, lambda: self._new(rid)):
                while len(self._batch.responses) >= MAX_BATCH_RESPONSES:
                    await self._sent.wait()  # the router reads slower than the engine steps
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one request's bug must not end the session's other requests
            log.exception("session request %s failed", rid)
            fill_error(self._new(rid), "internal error in the worker", 500)
        finally:
            if self._tasks.get(rid) is asyncio.current_task():
                del self._tasks[rid]
            self._ready.set()

    def _new(self, rid: str) -> worker_pb2.GenerateResponse:
        """A fresh response in the batch being built, tagged with its request."""
        response = self._batch.responses.add()
        response.request_id = rid
        self._ready.set()
        return response
