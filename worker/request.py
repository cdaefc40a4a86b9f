"""Request: one generation's parameters, state machine and streamed outputs (no torch here).

Data crossing the engine boundary: a caller submits `prompt_ids` + `SamplingParams` (optionally with a
`GuidedSpec`); the engine streams `RequestOutput`s; a request the engine refuses raises
`RequestRejected` with an HTTP-like status before anything streams.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from k2serve.worker.sampling_ranges import LOGIT_BIAS_RANGE, SAMPLING_RANGES, out_of_range
from k2serve.worker.schema_check import schema_problem

GUIDED_KINDS = ("json_schema", "json_object", "regex", "tool_call")
TOOL_CALL_MODES = ("required", "named", "auto")
FINISH_REASONS = ("stop", "length", "abort", "error")
GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy decoding


class RequestRejected(Exception):
    """The engine refused a request; `status` is HTTP-like (400 invalid, 429/503 over capacity)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class GuidedSpec:
    """A structured-output constraint.

    kind: "json_schema" (`schema`: dict or JSON text), "json_object" (any JSON object),
    "regex" (`regex`), or "tool_call" (`tools`: OpenAI function tool list; `mode`: "required" (at least
    one call of any declared tool), "named" (exactly one call of `name`) or "auto" (free text until the
    model opens a tool-call section, then only well-formed calls); `first_index`: the IDX of the first
    call id `functions.NAME:IDX`, which counts calls across the whole conversation).
    """

    kind: str
    schema: Any = None
    regex: str | None = None
    tools: tuple = ()
    mode: str = "auto"
    name: str | None = None
    first_index: int = 0

    def validate(self) -> None:
        """Raise RequestRejected(400) when the spec is incomplete or inconsistent."""
        if self.kind not in GUIDED_KINDS:
            raise RequestRejected(f"guided kind must be one of {GUIDED_KINDS}, got {self.kind!r}")
        if self.kind == "json_schema":
            _check_schema(self.schema_dict(), "the JSON schema")
        if self.kind == "regex" and not self.regex:
            raise RequestRejected("guided kind 'regex' needs a non-empty regex")
        if self.kind == "tool_call":
            self._validate_tools()

    def _validate_tools(self) -> None:
        if self.mode not in TOOL_CALL_MODES:
            raise RequestRejected(f"tool_call mode must be one of {TOOL_CALL_MODES}, got {self.mode!r}")
        names = self.tool_names()
        if not names:
            raise RequestRejected("guided tool_call needs at least one function tool")
        if self.mode == "named" and self.name not in names:
            raise RequestRejected(f"tool_call mode 'named' names {self.name!r}, not among the tools {names}")
        if self.first_index < 0:
            raise RequestRejected(f"tool_call first_index must be >= 0, got {self.first_index}")
        for fn in self.tool_functions():
            _check_schema(fn.get("parameters", {}), f"the parameters of tool {fn['name']!r}")

    def schema_dict(self) -> dict | bool:
        """The JSON schema as a Python object (parsed when given as text)."""
        if isinstance(self.schema, (dict, bool)):
            return self.schema
        if not isinstance(self.schema, str):
            raise RequestRejected("guided json_schema needs a schema (dict or JSON text)")
        try:
            return json.loads(self.schema)
        except json.JSONDecodeError as e:
            raise RequestRejected(f"guided json_schema is not valid JSON: {e}") from None

    def tool_functions(self) -> list[dict]:
        """The `function` objects of the declared tools (name, parameters)."""
        tools = json.loads(self.tools) if isinstance(self.tools, str) else list(self.tools)
        functions = []
        for tool in tools:
            if not isinstance(tool, dict):
                raise RequestRejected(f"each tool must be an object, got {tool!r}")
            fn = tool.get("function", tool)
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise RequestRejected(f"each tool needs a function with a name, got {tool!r}")
            functions.append(fn)
        return functions

    def tool_names(self) -> list[str]:
        return [fn["name"] for fn in self.tool_functions()]

    def cache_key(self) -> str:
        """A canonical string identifying the compiled grammar (equal specs share one)."""
        tools = json.loads(self.tools) if isinstance(self.tools, str) else list(self.tools)
        body = {"kind": self.kind, "schema": self.schema, "regex": self.regex, "tools": tools,
                "mode": self.mode, "name": self.name, "first_index": self.first_index}
        return json.dumps(body, sort_keys=True, default=str)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters (OpenAI/vLLM semantics).

    temperature 0 means greedy. top_k <= 0 disables top-k; top_p 1 and min_p 0 disable theirs.
    repetition_penalty (1 = off) divides positive / multiplies negative logits of tokens in prompt or
    output; presence/frequency penalties subtract per distinct / per occurrence over generated tokens.
    logprobs=True returns the sampled token's log probability plus `top_logprobs` alternatives, taken from
    the raw model distribution (log_softmax of the logits before penalties, bias, masks, temperature).
    stop_token_ids add to the model's stop ids (eos, <|im_end|>) unless ignore_eos drops those.
    max_tokens None means the engine default (EngineConfig.default_max_tokens, else up to the context length).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    max_tokens: int | None = None
    guided: GuidedSpec | None = None

    def validate(self, vocab_size: int, max_top_logprobs: int = 20) -> None:
        """Raise RequestRejected(400) naming the first invalid field (ranges: worker/sampling_ranges.py)."""
        for name in SAMPLING_RANGES:
            value = getattr(self, name)
            if value is not None:
                _check_message(out_of_range(name, value))
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(0 <= self.top_logprobs <= max_top_logprobs,
               f"top_logprobs must be in [0, {max_top_logprobs}], got {self.top_logprobs}")
        self._validate_token_ids(vocab_size)
        if self.guided is not None:
            self.guided.validate()

    def _validate_token_ids(self, vocab_size: int) -> None:
        for token_id, bias in self.logit_bias.items():
            _check(0 <= int(token_id) < vocab_size, f"logit_bias token id {token_id} outside [0, {vocab_size})")
            _check(bias in LOGIT_BIAS_RANGE, f"logit_bias for {token_id} must be in {LOGIT_BIAS_RANGE}, got {bias}")
        for token_id in self.stop_token_ids:
            _check(0 <= token_id < vocab_size, f"stop token id {token_id} outside [0, {vocab_size})")

    @property
    def is_greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW sample greedily: dividing logits by one overflows float32."""
        return self.temperature < GREEDY_BELOW


def _check_schema(schema: Any, what: str) -> None:
    """RequestRejected(400) when structured output cannot honour `schema` (worker/schema_check.py)."""
    problem = schema_problem(schema)
    if problem is not None:
        raise RequestRejected(f"{what} cannot be used for structured output: {problem}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestRejected(message, status=400)


def _check_message(message: str | None) -> None:
    if message is not None:
        raise RequestRejected(message, status=400)


@dataclass(frozen=True)
class TokenLogprob:
    """Log probability of one generated token and its most likely alternatives (most likely first)."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step produced for one request: new tokens since the previous output.

    Counts are cumulative. `finish_reason` is set on the last output: "stop" (a stop token, given in
    `stop_token_id`), "length" (max_tokens or the context), "abort", or "error" (with `error`).
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    stop_token_id: int | None = None
    error: str | None = None
    error_status: int = 500  # HTTP-like: 400 when the request itself cannot be served (an unsatisfiable grammar)

    def merged(self, later: "RequestOutput") -> "RequestOutput":
        """This output followed by `later` as one: tokens and logprobs joined, `later`'s counts and finish."""
        logprobs = None
        if self.new_logprobs is not None or later.new_logprobs is not None:
            logprobs = (self.new_logprobs or []) + (later.new_logprobs or [])
        return RequestOutput(
            self.request_id, self.new_token_ids + later.new_token_ids, logprobs, later.prompt_tokens,
            later.completion_tokens, later.cached_tokens, later.finished, later.finish_reason,
            later.stop_token_id, later.error, later.error_status,
        )


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


class Request:
    """One generation in the engine: tokens so far, how many of them are in the KV cache, and status.

    `token_ids` holds the prompt followed by the generated tokens; `num_computed_tokens` of them have
    their latents in the cache. A request samples in a step that computes its last token.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 stop_ids: frozenset[int] = frozenset(), max_new_tokens: int | None = None):
        if not prompt_ids:
            raise RequestRejected(f"request {request_id!r} has an empty prompt")
        self.request_id = request_id
        self.params = params
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_ids = stop_ids
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else params.max_tokens
        self.stop_token_id: int | None = None
        self.error: str | None = None
        self.error_status = 500
        self.logprobs: list[TokenLogprob] = []
        self.num_emitted = 0  # output tokens already reported to the caller
        self.num_resumed = 0  # leading output tokens generated elsewhere (a continuation): no logprobs here
        self.guide: Any = None  # per-request grammar matcher (worker/guided.py), if guided

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> None:
        """Add a sampled token, then finish the request if it hit a stop id or its length limit."""
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token_id in self.stop_ids and self.num_output_tokens > self.params.min_tokens:
            self.status, self.stop_token_id = RequestStatus.FINISHED_STOPPED, token_id
        elif self.max_new_tokens is not None and self.num_output_tokens >= self.max_new_tokens:
            self.status = RequestStatus.FINISHED_LENGTH

    def resume(self, output_ids: Sequence[int]) -> None:
        """Take `output_ids` as this request's output so far: a continuation of a request that another
        worker group generated them for before it failed. They count as generated (max_tokens, min_tokens,
        penalties, a seeded sampler's step), may finish the request (a stop id, the length limit), and are
        not reported again. RequestRejected(400) if they go on past the request's end."""
        for token_id in output_ids:
            if self.is_finished:
                raise RequestRejected(f"output_token_ids go on after the request ended "
                                      f"({self.status.value}, {self.num_output_tokens} tokens)")
            self.append_token(token_id)
        self.num_emitted = self.num_resumed = len(output_ids)

    def finish(self, status: RequestStatus, error: str | None = None, error_status: int = 500) -> None:
        self.status, self.error, self.error_status = status, error, error_status

    def take_output(self) -> RequestOutput:
        """The tokens generated since the previous call, with the cumulative counts."""
        new = self.token_ids[self.num_prompt_tokens + self.num_emitted:]
        logprobs = self.logprobs[self.num_emitted - self.num_resumed:] if self.params.logprobs else None
        self.num_emitted += len(new)
        return RequestOutput(
            request_id=self.request_id, new_token_ids=new, new_logprobs=logprobs,
            prompt_tokens=self.num_prompt_tokens, completion_tokens=self.num_output_tokens,
            cached_tokens=self.num_cached_tokens, finished=self.is_finished,
            finish_reason=self.status.value if self.is_finished else None,
            stop_token_id=self.stop_token_id, error=self.error, error_status=self.error_status,
        )

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
