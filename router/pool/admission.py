"""AdmissionControl: the router's concurrency limit with a bounded FIFO queue; a full queue raises
`Overloaded` (HTTP 429 in the API's own error format)."""

from __future__ import annotations

import asyncio
import collections
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from k2serve.router.errors import APIError


class AdmissionConfig(BaseModel):
    """The router's admission limits (AdmissionControl's two numbers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_concurrency: int = Field(256, ge=1, description="Requests the router forwards at once")
    max_queue: int = Field(1024, ge=0, description="Requests waiting for a slot; beyond it: 429")


class Overloaded(APIError):
    """The router is at its concurrency limit and its queue is full (HTTP 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(429, message, code="overloaded")


class AdmissionControl:
    """At most `max_concurrency` requests run; up to `max_queue` more wait in FIFO order."""

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError(f"AdmissionControl needs max_concurrency >= 1 and max_queue >= 0, "
                             f"got {max_concurrency} and {max_queue}")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.active = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one concurrency slot for the body; raises Overloaded when the queue is full, and APIError 504
        when `deadline` (time.monotonic(); None: none) passes while the request waits in it."""
        try:
            async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.monotonic())):
                await self._acquire()
        except TimeoutError:
            raise APIError(504, "the request's deadline passed while it waited for a free slot") from None
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.active < self.max_concurrency and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(f"server overloaded: {self.active} requests running and "
                             f"{len(self._waiters)} queued (limits {self.max_concurrency} and {self.max_queue})")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _release hands its slot over: `active` is unchanged
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived together with the cancellation: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1
