"""Test helpers for the router tests: a scripted fake worker, a fake worker pool and a uvicorn server thread."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Sequence

import httpx
import uvicorn

from k2serve.router.pool.worker import (Finished, GenerateParams, StreamItem, TokenChunk, TokenLogprob, Worker,
                                       WorkerError, WorkerLoad, WorkerModelInfo)

TOOL_CALL_TEXT = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:{idx}"
                  "<|tool_call_argument_begin|>{{\"city\": \"Beijing\"}}<|tool_call_end|><|tool_calls_section_end|>")


def free_port() -> int:
    """A free port below Linux's ephemeral range (32768 up) and above Ray's worker ports (10002-19999):
    a port chosen by binding port 0 comes from the range that every process binding port 0 (Ray's
    many) and every outgoing connection draws from, so it can be gone before the process under test
    binds it."""
    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


@dataclass
class ScriptedBackend:
    """A fake worker: `script(params, prompt_text)` returns the text to 'generate' (or a WorkerError).

    The text is encoded with control tokens allowed (so tool-call markers become marker tokens), streamed
    one token per chunk, then <|im_end|> ends it with finish "stop" (or max_tokens ends it: "length").
    """

    tokenizer: object
    script: Callable[[GenerateParams, str], str | WorkerError]
    context_length: int = 4096
    delay: float = 0.0
    calls: list[GenerateParams] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    cancelled: list[str] = field(default_factory=list)
    healthy: bool = True

    async def generate(self, params: GenerateParams):
        prompt = self.tokenizer.decode(params.prompt_token_ids)
        self.calls.append(params)
        self.prompts.append(prompt)
        result = self.script(params, prompt)
        if isinstance(result, WorkerError):
            raise result
        ids = self.tokenizer.encode_with_special(result) + [self.tokenizer.im_end_id]
        limit = params.max_tokens or len(ids)
        self.active.add(params.request_id)
        finished = False
        try:
            for n, token in enumerate(ids[:limit], start=1):
                await asyncio.sleep(self.delay)
                lps = (TokenLogprob(token, -0.25, tuple((token, -0.25) for _ in range(params.logprobs))),) \
                    if params.logprobs is not None else ()
                yield TokenChunk((token,), lps, len(params.prompt_token_ids), n, 0)
            stopped = limit >= len(ids)
            finished = True
            yield Finished("stop" if stopped else "length", self.tokenizer.im_end_id if stopped else None,
                           len(params.prompt_token_ids), min(limit, len(ids)), 0)
        finally:
            if not finished:
                self.cancelled.append(params.request_id)
            self.active.discard(params.request_id)

    async def get_load(self, timeout: float = 5.0) -> WorkerLoad:
        return WorkerLoad(num_running=len(self.active))

    async def get_model_info(self, timeout: float = 10.0) -> WorkerModelInfo:
        return WorkerModelInfo("kimi-k2-tiny", self.context_length, 1280,
                               (self.tokenizer.eos_id, self.tokenizer.im_end_id), "")

    async def health(self, timeout: float = 2.0) -> bool:
        return self.healthy

    async def close(self) -> None:
        return None


class ListPool:
    """A WorkerPool fake: each request goes to the next of `workers` in turn, with no admission, balancing
    or retries (GroupPool's own tests cover those), so a worker's refusal or failure reaches the API as is."""

    def __init__(self, workers: Sequence[Worker]):
        self.workers = list(workers)
        self._next = itertools.cycle(self.workers)

    def generate(self, params: GenerateParams) -> AsyncIterator[StreamItem]:
        return next(self._next).generate(params)

    async def model_info(self) -> WorkerModelInfo | None:
        for worker in self.workers:
            try:
                return await worker.get_model_info()
            except WorkerError:
                continue
        return None

    async def health(self) -> list[bool]:
        return [await worker.health() for worker in self.workers]


class ServerThread:
    """Runs an ASGI app on uvicorn in a background thread at http://127.0.0.1:PORT."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/health", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"router did not start on {self.url}")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class WorkerThread:
    """A real worker: AsyncEngine on the tiny checkpoint behind serve_worker, on its own event loop thread."""

    def __init__(self, model_dir, max_model_len: int = 1024, num_kv_blocks: int = 128):
        from k2serve.worker.async_engine import AsyncEngine
        from k2serve.worker.config import EngineConfig
        from k2serve.worker.engine import Engine
        from k2serve.worker.server import ModelInfo

        config = EngineConfig(max_model_len=max_model_len, num_kv_blocks=num_kv_blocks, max_num_seqs=8)
        self.engine = AsyncEngine(Engine.from_model_dir(model_dir, config))
        self.info = ModelInfo.from_model_dir(model_dir, model_name="kimi-k2-tiny", context_length=max_model_len)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "WorkerThread":
        from k2serve.worker.server import serve_worker

        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            serve_worker(self.engine, "127.0.0.1", 0, self.info), self.loop)
        self.server = future.result(timeout=30)
        self.address = f"127.0.0.1:{self.server.k2serve_port}"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.engine.shutdown()
