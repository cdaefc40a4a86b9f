"""AsyncEngine: an asyncio front for Engine, stepping it on a background thread while there is work.

Only the engine thread touches the Engine: submissions and aborts travel to it through a command queue,
and a step's outputs come back to their streams' event loop with one call_soon_threadsafe per loop. If a
step raises, every in-flight request ends with an error output instead of hanging.

Health (`health()`, worker/health.py): while idle the engine thread runs a heartbeat (a no-op step
through every rank) every `heartbeat_interval_s`; a watchdog thread fails the engine when a step or a
heartbeat runs longer than `hang_timeout_s`, and a step that raises is followed by a heartbeat, whose
failure means the group's collectives are broken. A failed engine ends every stream at once with a 503
(a router re-sends those requests elsewhere) and refuses new ones; it does not recover. `drain` stops
taking requests, lets the running ones finish within a grace period and ends the rest with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from k2serve.worker.engine import Engine, EngineLoad
from k2serve.worker.health import DRAINING, FAILED, SERVING, EngineHealth, StepClock
from k2serve.worker.request import RequestOutput, RequestRejected, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """`generate` streams RequestOutputs; `abort` ends a request; `get_load` is a snapshot of the last step.

    `heartbeat_interval_s` None: no heartbeats; `hang_timeout_s` None: no watchdog.
    """

    def __init__(self, engine: Engine, idle_wait_s: float = 0.5, heartbeat_interval_s: float | None = None,
                 hang_timeout_s: float | None = None):
        self.engine = engine
        self.idle_wait_s = min(idle_wait_s, heartbeat_interval_s or idle_wait_s)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.hang_timeout_s = hang_timeout_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._load = engine.get_load()
        self._clock = StepClock()
        self._last_step = time.monotonic()
        self._failure: str | None = None
        self._draining = False
        self._watchdog: threading.Thread | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        """Start the engine thread and the watchdog (idempotent; generate() calls it)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="k2serve-engine", daemon=True)
            self._thread.start()
        if self.hang_timeout_s is not None and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="k2serve-watchdog", daemon=True)
            self._watchdog.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still in flight end with an error output, new ones get 503."""
        self._stopping.set()
        self._commands.put(None)  # wake it
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- API ----

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       output_ids: Sequence[int] = ()) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes; `output_ids` makes it a continuation
        (Engine.add_request).

        Raises RequestRejected (HTTP-like status) before yielding anything if the engine refuses it.
        Leaving the iteration early (break, cancellation) aborts the request and frees its blocks.
        """
        self._check_serving()
        self.start()
        loop = asyncio.get_running_loop()
        if params.guided is not None:
            # off the engine thread: a large grammar compiles for seconds, and every request would wait
            await loop.run_in_executor(None, self.engine.compile_guide, params.guided)
        stream = _Stream(loop, asyncio.Queue())
        accepted = loop.create_future()
        self._commands.put(("add", request_id, list(prompt_ids), params, tuple(output_ids), stream, accepted))
        finished = False
        try:
            try:
                await accepted
            except asyncio.CancelledError:
                raise
            except BaseException:
                finished = True  # rejected: nothing to abort (and the id may belong to another request)
                raise
            while not finished:
                out: RequestOutput = await stream.queue.get()
                while not out.finished and not stream.queue.empty():  # a slow consumer gets one merged output
                    out = out.merged(stream.queue.get_nowait())
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        """Abort a request (thread-safe, returns at once); False if no stream with that id is open."""
        with self._lock:
            known = request_id in self._streams
        self._commands.put(("abort", request_id))
        return known

    def get_load(self) -> EngineLoad:
        return self._load

    def health(self) -> EngineHealth:
        """Whether this engine can generate (thread-safe; answers even while the engine thread hangs)."""
        if self._failure is not None:
            return EngineHealth(FAILED, self._failure)
        if self._stopping.is_set():
            return EngineHealth(FAILED, "the engine is shutting down")
        if self._draining:
            return EngineHealth(DRAINING, "the worker is draining")
        return EngineHealth(SERVING)

    def _check_serving(self) -> None:
        health = self.health()
        if not health.is_serving:
            raise RequestRejected(f"the worker cannot take requests: {health.reason}", status=503)

    async def drain(self, grace_s: float) -> int:
        """Take no new requests, wait up to `grace_s` for the running ones to finish, then end the rest
        with a 503 (a router re-sends them elsewhere). Returns how many were ended that way."""
        self._draining = True
        deadline = time.monotonic() + grace_s
        while self._num_streams() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._end_streams(f"the worker drained for {grace_s:g}s and stopped before this request finished")

    def _num_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def _fail(self, reason: str) -> None:
        """The engine cannot generate any more: end every stream with a 503 and refuse new requests."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = reason
        log.error("worker failed: %s", reason)
        self._end_streams(f"the worker group failed: {reason}")

    def _end_streams(self, message: str) -> int:
        """End every open stream with an error output now, from any thread (the engine may be stuck in a
        step); their requests stay in the engine, which is failed or stopping."""
        with self._lock:
            streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            self._commands.put(("abort", request_id))  # frees its blocks if the engine still steps
            out = RequestOutput(request_id, [], None, 0, 0, 0, finished=True, finish_reason="error", error=message,
                                error_status=503)
            try:
                stream.loop.call_soon_threadsafe(_deliver, [(stream.queue, out)])
            except RuntimeError:  # the consumers' loop is closed: nobody is listening
                pass
        return len(streams)

    def _watch(self) -> None:
        period = min(1.0, self.hang_timeout_s / 4)
        while not self._stopping.wait(period) and self._failure is None:
            stalled = self._clock.stalled_for()
            if stalled > self.hang_timeout_s:
                self._fail(f"a step has run for {stalled:.0f}s (hang_timeout_s {self.hang_timeout_s:g}): "
                           f"a rank hangs")

    # ---- engine thread ----

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._iterate()
            except Exception as exc:  # noqa: BLE001 - never let the thread die with clients waiting
                log.exception("engine loop failed; failing all in-flight requests")
                self._dispatch(self.engine.fail_all(f"engine failure: {type(exc).__name__}: {exc}"))
        self._dispatch(self.engine.fail_all("the engine is shutting down"))

    def _iterate(self) -> None:
        failed = self._failure is not None  # a failed engine steps no more: wait for commands, do not spin
        self._drain_commands(block=failed or not self.engine.has_unfinished())
        if self._stopping.is_set() or failed:
            return
        if self.engine.has_unfinished():
            self._dispatch(self._safe_step())
        if not self.engine.has_unfinished():
            if self.engine.has_uncollected_moe_stats():
                self._dispatch(self._safe_step())  # nothing scheduled: it collects the last steps' statistics
            self._heartbeat_when_due()
        self._load = self.engine.get_load()

    def _heartbeat_when_due(self) -> None:
        interval = self.heartbeat_interval_s
        if interval is not None and time.monotonic() - self._last_step >= interval:
            self._heartbeat()

    def _heartbeat(self) -> bool:
        """A no-op step through every rank; False (and the engine failed) when a rank could not take part."""
        try:
            with self._clock.running():
                self.engine.heartbeat()
        except Exception as exc:  # noqa: BLE001 - a broken collective: the group cannot step again
            self._fail(f"a heartbeat through every rank failed: {type(exc).__name__}: {exc}")
            return False
        finally:
            self._last_step = time.monotonic()
        return True

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            return
        _, request_id, prompt_ids, params, output_ids, stream, accepted = command
        try:
            with self._lock:
                self._check_serving()  # it may have failed or begun draining while the request was queued
                if request_id in self._streams:  # until its last output is delivered, an id stays taken
                    raise RequestRejected(f"request id {request_id!r} is already in use")
            self.engine.add_request(request_id, prompt_ids, params, output_ids)
        except Exception as exc:  # noqa: BLE001 - rejections and bad input go back to the caller
            stream.loop.call_soon_threadsafe(_set_exception, accepted, exc)
            return
        with self._lock:
            self._streams[request_id] = stream
        stream.loop.call_soon_threadsafe(_set_result, accepted)

    def _safe_step(self) -> list[RequestOutput]:
        try:
            with self._clock.running():
                return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving if the group still steps
            log.exception("engine step failed; failing all in-flight requests")
            outputs = self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            self._heartbeat()  # a step that failed inside a collective leaves the group broken
            return outputs
        finally:
            self._last_step = time.monotonic()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop for the whole step (waking a
        loop is a syscall, and each consumer would otherwise run in a pass of its own). The load snapshot is
        taken first, so a consumer that has seen these outputs never reads an older load."""
        self._load = self.engine.get_load()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the consumers' loop is closed: nobody is listening
                pass


def _deliver(batch: list) -> None:
    for queue_, out in batch:
        queue_.put_nowait(out)


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
