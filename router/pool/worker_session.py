"""RequestMux: the router's end of one k2serve.v1 Session stream to a worker group.

All of the router's requests to a group share one bidirectional gRPC call: generate and abort requests
go out through an outbox that gRPC drains in order, everything queued meanwhile in one message (a
gRPC message costs far more than its bytes, and requests arrive in bursts); one reader task takes each
SessionResponse batch apart and hands every response to its request's inbox. A worker step's tokens for
all of its requests thus arrive in one message instead of one message per request. When the call fails
(the worker died, the network broke) every request in flight gets the same WorkerError, exactly as its
own stream would have failed, and the mux is closed; the owner opens a
new one for the next request.

A request's responses wait in its inbox until its consumer takes them. A consumer that stops taking them
(an HTTP client that stopped reading, so that the router's writes block) would let its inbox grow for as
long as the worker generates: past `max_buffered` responses the request is aborted on the worker, its
inbox emptied, and its consumer finds a 408 error next. A request's deadline likewise ends it with a 504
error (and an abort) when the worker has not finished it in time, even if the worker no longer answers.

On the wire a request travels under an id unique to this mux (`<request id>@<mux tag>.<n>`): request
ids come from clients (x-request-id) and may repeat, and a reused id must never receive the tokens of
the request that had it before (whose late responses may still be on their way) nor collide in the
engine with another router's request.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
import uuid
from typing import Any, AsyncIterator, Callable

import grpc

from k2serve.v1 import worker_pb2

# What one request may carry to the worker. The worker accepts up to this (worker/server.py sets the
# same receive limit); a request over it fails alone instead of failing the session of every request.
MAX_REQUEST_BYTES = 64 * 1024 * 1024 - 1024

FailureFactory = Callable[[grpc.aio.AioRpcError | None, str], Exception]


class RequestMux:
    """Many requests over one Session call. Build it inside the event loop that will use it.

    `on_failure(rpc_error, reason)` makes the exception every request in flight raises when the call
    ends: from its gRPC error, or from `reason` when there is none (the worker or the router ended it).
    """

    def __init__(self, stub: Any, on_failure: FailureFactory, max_buffered: int = 1024):
        self.max_buffered = max_buffered
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._inboxes: dict[str, Inbox] = {}
        self._on_failure = on_failure
        self._tag = uuid.uuid4().hex[:8]
        self._serial = itertools.count()
        self._failure: Exception | None = None
        self._call = stub.Session(self._requests())
        self._reader = asyncio.create_task(self._read())

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def generate(self, request: worker_pb2.GenerateRequest,
                       deadline: float | None = None) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """Send one request and yield its responses up to its last (`complete` or `error`); at `deadline`
        (time.monotonic()) an unfinished request ends with a 504 error.

        Leaving early (break, cancellation, an exception in the consumer) aborts it on the worker.
        """
        if self._failure is not None:
            raise self._failure
        if request.ByteSize() > MAX_REQUEST_BYTES:
            yield _error(f"the request is {request.ByteSize()} bytes; at most {MAX_REQUEST_BYTES} go to a worker", 413)
            return
        wire_id = request.request_id = f"{request.request_id}@{self._tag}.{next(self._serial)}"
        inbox = self._inboxes[wire_id] = Inbox()
        timer = None if deadline is None else _cut_at(deadline, inbox)
        finished = False
        try:
            self._outbox.put_nowait(request)
            while not finished:
                response = await inbox.get()
                if isinstance(response, Exception):
                    if isinstance(response, Cut):  # the request ends here; the finally aborts it
                        yield _error(response.message, response.status)
                        return
                    finished = True
                    raise response
                finished = response.WhichOneof("response") != "chunk"
                yield response
        finally:
            if timer is not None:
                timer.cancel()
            self._inboxes.pop(wire_id, None)  # gone already when the reader cut it
            if not finished and self._failure is None:
                self._outbox.put_nowait(wire_id)  # an abort

    async def close(self) -> None:
        """End the call; requests still in flight fail as if the worker had gone."""
        self._call.cancel()
        await asyncio.wait({self._reader})  # not cancelled with its caller: the reader must run its cleanup

    async def _requests(self) -> AsyncIterator[worker_pb2.SessionRequest]:
        """What gRPC sends: each time it is ready for a message, all that the outbox holds; None ends it."""
        while (item := await self._outbox.get()) is not None:
            message = worker_pb2.SessionRequest()
            _add(message, item)
            while not self._outbox.empty():
                item = self._outbox.get_nowait()
                if item is None:
                    yield message
                    return
                _add(message, item)
            yield message

    async def _read(self) -> None:
        failure = self._on_failure(None, "the worker ended the session")
        try:
            async for batch in self._call:
                for response in batch.responses:
                    inbox = self._inboxes.get(response.request_id)
                    # None: a request that left (and was aborted) meanwhile
                    if inbox is not None and inbox.put(response) > self.max_buffered:
                        self._cut(response.request_id, inbox)
        except grpc.aio.AioRpcError as exc:
            failure = self._on_failure(exc, "")
        except asyncio.CancelledError:
            if not self._call.cancelled():
                raise
            failure = self._on_failure(None, "the router closed the session")  # close() cancelled the call
        finally:
            self._failure = failure
            self._outbox.put_nowait(None)  # ends gRPC's task that drains the outbox, whatever ended the call
            for inbox in self._inboxes.values():
                inbox.put(failure)


    def _cut(self, wire_id: str, inbox: "Inbox") -> None:
        """Its consumer is not taking its responses: abort it now and free what waits in its inbox."""
        del self._inboxes[wire_id]
        self._outbox.put_nowait(wire_id)
        inbox.replace(Cut(f"the client did not read its stream: {self.max_buffered} responses were waiting "
                          f"for it, and the request was cancelled", 408))


class Cut(Exception):
    """An inbox item that ends its request with an error response (`status` HTTP-like) and an abort."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, status


def _cut_at(deadline: float, inbox: "Inbox") -> asyncio.TimerHandle:
    cut = Cut("the request did not finish before its deadline", 504)
    return asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), inbox.put, cut)


class Inbox:
    """One request's responses, handed over by the mux's reader and awaited by the request's task.

    What asyncio.Queue does for one consumer and no size limit, without its bookkeeping for `join`,
    `task_done` and waiting producers, which would run for every streamed token.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: Any) -> int:
        """Hand over `item`; returns how many items now wait."""
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return len(self._items)

    def replace(self, item: Any) -> None:
        """Drop every waiting item and hand over `item` instead."""
        self._items.clear()
        self.put(item)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


def _add(message: worker_pb2.SessionRequest, item: worker_pb2.GenerateRequest | str) -> None:
    """Outbox items: a GenerateRequest to start, or the wire id of a request to abort."""
    if isinstance(item, str):
        message.abort.add(request_id=item)
    else:
        message.generate.append(item)


def _error(message: str, status: int) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(error=worker_pb2.GenerateError(message=message, status=status))
