"""AsyncEngine: an asyncio front for Engine, stepping it on a background thread while there is work.

Only the engine thread touches the Engine: submissions and aborts travel to it through a command queue,
and a step's outputs come back to their streams' event loop with one call_soon_threadsafe per loop. If a
step raises, every in-flight request ends with an error output instead of hanging.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from k2serve.worker.engine import Engine, EngineLoad
from k2serve.worker.request import RequestOutput, RequestRejected, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """`generate` streams RequestOutputs; `abort` ends a request; `get_load` is a snapshot of the last step."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.5):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._load = engine.get_load()

    # ---- lifecycle ----

    def start(self) -> None:
        """Start the engine thread (idempotent; generate() calls it)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="k2serve-engine", daemon=True)
            self._thread.start()

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
        if self._stopping.is_set():
            raise RequestRejected("the engine is shutting down", status=503)
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
        self._drain_commands(block=not self.engine.has_unfinished())
        if self._stopping.is_set():
            return
        if self.engine.has_unfinished():
            self._dispatch(self._safe_step())
        if not self.engine.has_unfinished():
            self.engine.flush_moe_stats()  # idle: record the last steps' expert load now, not at the next burst
        self._load = self.engine.get_load()

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
            return self.engine.step()
        except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
            log.exception("engine step failed; failing all in-flight requests")
            return self.engine.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop for the whole step (waking a
        loop is a syscall, and each consumer would otherwise run in a pass of its own)."""
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
