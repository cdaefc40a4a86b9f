"""What the router exchanges with one worker group: the request, its stream items, load and model facts.

Plain dataclasses: protobuf objects stay in the gRPC modules (worker_client.py, worker_session.py).
`Worker` is the interface of one group as the router reaches it; WorkerClient implements it over gRPC,
and tests implement it with scripted fakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol


@dataclass(frozen=True)
class GuidedRequest:
    """A structured-output constraint: kind is json_schema | json_object | regex | tool_call."""

    kind: str
    json_schema: str = ""       # serialized schema for kind json_schema
    regex: str = ""             # pattern for kind regex
    tools: tuple = ()           # OpenAI tool dicts for kind tool_call
    mode: str = ""              # tool_call: auto | required | named
    name: str = ""              # tool_call mode named: the function name
    first_index: int = 0        # tool_call: index of the turn's first call id


@dataclass(frozen=True)
class GenerateParams:
    """One generation request as the router builds it; None means the worker's default."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool | None = None
    logprobs: int | None = None
    guided: GuidedRequest | None = None
    # A continuation (the pool migrates a request after its group failed mid-stream): the tokens it already
    # generated. The worker goes on after them as if it had generated them itself.
    output_token_ids: tuple[int, ...] = ()
    deadline: float | None = None  # time.monotonic() by which the request must end (None: no deadline)


@dataclass(frozen=True)
class TokenLogprob:
    """Log probability of one generated token and its top alternatives ((token_id, logprob), ...)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """New tokens from the worker, with cumulative counts."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Finished:
    """The request ended: finish_reason stop | length | abort."""

    finish_reason: str
    matched_stop_token_id: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


StreamItem = TokenChunk | Finished


@dataclass(frozen=True)
class WorkerLoad:
    """GetLoad snapshot."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0


@dataclass(frozen=True)
class WorkerModelInfo:
    """GetModelInfo answer."""

    model_name: str
    context_length: int
    vocab_size: int
    stop_token_ids: tuple[int, ...] = ()
    tokenizer_id: str = ""


class WorkerError(Exception):
    """A worker refused or failed a request; `status` is HTTP-like: 400 the request is bad, 408 the client
    did not read its stream (RequestMux), 429 / 503 over capacity or gone, 500 the worker failed, 504 the
    request's deadline passed."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message = message
        self.status = status


class Worker(Protocol):
    """One worker group as the router reaches it.

    `generate` streams TokenChunks and then one Finished, or raises WorkerError; leaving the iteration
    early (break, cancellation) aborts the request on the worker. The other calls raise WorkerError when
    the group does not answer, except `health`, which answers False. `close` ends the requests in flight
    with WorkerError(503) and releases the connection; a later call opens a new one.
    """

    def generate(self, params: GenerateParams) -> AsyncIterator[StreamItem]: ...

    async def get_load(self, timeout: float = 5.0) -> WorkerLoad: ...

    async def get_model_info(self, timeout: float = 10.0) -> WorkerModelInfo: ...

    async def health(self, timeout: float = 2.0) -> bool: ...

    async def close(self) -> None: ...
