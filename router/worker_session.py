"""RequestMux: the router's end of one k2serve.v1 Session stream to a worker group.

All of the router's requests to a group share one bidirectional gRPC call: generate and abort requests
go out through an outbox that gRPC drains in order; one reader task takes each SessionResponse batch
apart and hands every response to its request's inbox. A worker step's tokens for all of its requests
thus arrive in one message instead of one message per request, which is most of the gRPC CPU per token
on both ends. When the call fails (the worker died, the network broke) every request in flight gets the
same WorkerError, exactly as its own stream would have failed, and the mux is closed; the owner opens a
new one for the next request.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import grpc

from k2serve.v1 import worker_pb2


class RequestMux:
    """Many requests over one Session call. Build it inside the event loop that will use it.

    `on_failure(exc)` maps the call's gRPC error (or None when the worker ended the session) to the
    exception every request in flight raises.
    """

    def __init__(self, stub: Any, on_failure):
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._inboxes: dict[str, asyncio.Queue] = {}
        self._on_failure = on_failure
        self.closed = False
        self._call = stub.Session(self._requests())
        self._reader = asyncio.create_task(self._read())

    async def generate(self, request: worker_pb2.GenerateRequest) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Send one request and yield its responses up to its last (`complete` or `error`).

        Leaving early (break, cancellation, an exception in the consumer) aborts it on the worker.
        """
        rid = request.request_id
        if self.closed:
            raise self._on_failure(None)
        if rid in self._inboxes:  # what the engine answers for an id in use, without the round trip
            message = f"request id {rid!r} is already in use"
            yield worker_pb2.GenerateResponse(error=worker_pb2.GenerateError(message=message, status=400))
            return
        inbox = self._inboxes[rid] = asyncio.Queue()
        finished = False
        try:
            self._outbox.put_nowait(worker_pb2.SessionRequest(generate=request))
            while not finished:
                response = await inbox.get()
                if isinstance(response, Exception):
                    finished = True
                    raise response
                finished = response.WhichOneof("response") != "chunk"
                yield response
        finally:
            del self._inboxes[rid]
            if not finished and not self.closed:
                self._outbox.put_nowait(worker_pb2.SessionRequest(abort=worker_pb2.AbortRequest(request_id=rid)))

    async def close(self) -> None:
        """End the call; requests still in flight fail as if the worker had gone."""
        self._call.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass

    async def _requests(self) -> AsyncIterator[worker_pb2.SessionRequest]:
        while True:
            yield await self._outbox.get()

    async def _read(self) -> None:
        failure: Exception = self._on_failure(None)
        try:
            async for batch in self._call:
                for response in batch.responses:
                    inbox = self._inboxes.get(response.request_id)
                    if inbox is not None:  # None: a request that left (and was aborted) meanwhile
                        inbox.put_nowait(response)
        except grpc.aio.AioRpcError as exc:
            failure = self._on_failure(exc)
        except asyncio.CancelledError:  # how grpc.aio ends reading a call that close() cancelled
            failure = self._on_failure(None)
        finally:
            self.closed = True
            for inbox in self._inboxes.values():
                inbox.put_nowait(failure)
