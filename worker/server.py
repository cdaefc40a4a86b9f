"""WorkerServicer: the k2serve.v1.Worker gRPC service over an AsyncEngine (grpc.aio).

Protobuf objects stay in the gRPC modules (here, worker/session.py and worker/responses.py on the worker's
side): the servicer converts requests into the engine's own SamplingParams / GuidedSpec and
RequestOutputs into GenerateResponses. Routers use Session (worker/session.py), other gRPC clients may
use Generate: one stream per request.

Error scheme (documented in worker.proto): an engine rejection or bad parameters end the stream
with one `GenerateResponse.error` carrying an HTTP-like status; the gRPC call itself ends OK.
A client that cancels the stream aborts the request, which frees its KV cache blocks.
The gRPC port is for routers only: with a ServerSecurity (worker/security.py) it speaks TLS and takes only
calls that carry the shared token or a client certificate the CA signed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from k2serve.v1 import worker_pb2, worker_pb2_grpc
from k2serve.worker.request import GuidedSpec, RequestOutput, RequestRejected, SamplingParams
from k2serve.worker.responses import ResponseFactory, fill_chunk, fill_error, fill_final
from k2serve.worker.security import ServerSecurity
from k2serve.worker.session import WorkerSession
from k2serve.worker.vocab import Vocab

from k2serve.worker.health import EngineHealth

if TYPE_CHECKING:  # the engine module imports torch; this one serves gRPC without it
    from k2serve.worker.engine import EngineLoad

log = logging.getLogger(__name__)

SERVICE_NAME = "k2serve.v1.Worker"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as the router's channel: one request must never exceed what a session carries


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the served model, answered by GetModelInfo."""

    model_name: str
    context_length: int
    vocab_size: int
    stop_token_ids: tuple[int, ...] = ()
    tokenizer_id: str = ""

    @classmethod
    def from_model_dir(cls, path: str | Path, model_name: str | None = None,
                       context_length: int | None = None) -> "ModelInfo":
        """Read config.json and the tokenizer files of a K2-format checkpoint (stop ids as the engine's Vocab).

        `context_length` overrides max_position_embeddings (pass the engine's max_model_len).
        """
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        return cls(model_name=model_name or path.name,
                   context_length=int(context_length or config.get("max_position_embeddings", 0)),
                   vocab_size=int(config.get("vocab_size", 0)),
                   stop_token_ids=Vocab.from_model_dir(path).stop_token_ids,
                   tokenizer_id=_tokenizer_id(path))


def _tokenizer_id(path: Path) -> str:
    model = path / "tiktoken.model"
    return "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest() if model.exists() else ""


_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "ignore_eos")


def sampling_kwargs(msg: worker_pb2.SamplingParams) -> dict[str, Any]:
    """The explicitly set sampling fields of a proto message (unset = engine default)."""
    kwargs = {name: getattr(msg, name) for name in _SAMPLING_FIELDS if msg.HasField(name)}
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    if msg.HasField("logprobs"):  # unset: no logprobs; N: the sampled token's plus the top N
        kwargs["logprobs"], kwargs["top_logprobs"] = True, msg.logprobs
    return kwargs


def guided_from_proto(msg: worker_pb2.GuidedSpec) -> GuidedSpec:
    """GuidedSpec proto -> worker.request.GuidedSpec."""
    kind = msg.WhichOneof("kind")
    if kind == "json_schema":
        return GuidedSpec(kind=kind, schema=msg.json_schema)
    if kind == "regex":
        return GuidedSpec(kind=kind, regex=msg.regex)
    if kind == "tool_call":
        tc = msg.tool_call
        try:
            tools = tuple(json.loads(tc.tools_json or "[]"))
        except (json.JSONDecodeError, TypeError) as exc:
            raise RequestRejected(f"tool_call tools_json is not a JSON list: {exc}") from None
        return GuidedSpec(kind=kind, tools=tools, mode=tc.mode or "auto", name=tc.name or None,
                          first_index=tc.first_index)
    return GuidedSpec(kind="json_object")


def params_from_request(request: worker_pb2.GenerateRequest) -> SamplingParams:
    """GenerateRequest -> SamplingParams (with its GuidedSpec when one is set); RequestRejected(400) if bad."""
    kwargs = sampling_kwargs(request.sampling)
    if request.HasField("guided") and request.guided.WhichOneof("kind"):
        kwargs["guided"] = guided_from_proto(request.guided)
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RequestRejected(f"invalid sampling parameters: {exc}") from None


class ServedEngine(Protocol):
    """What the servicer needs from the engine (AsyncEngine; tests and benchmarks use fakes).

    `generate` streams a request's RequestOutputs until one is finished, or raises RequestRejected (with an
    HTTP-like status) before the first; closing it early aborts the request. `output_ids` makes the request
    a continuation of one that another group began (GenerateRequest.output_token_ids). `abort` returns at once:
    False when no request has that id. `get_load` is a snapshot. `health` says whether it can generate
    (answering even while a step hangs); `drain` refuses new requests, waits up to `grace_s` for the
    running ones and ends the rest with a 503, returning how many it ended.
    """

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 output_ids: Sequence[int] = ()) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> bool: ...

    def get_load(self) -> EngineLoad: ...

    def health(self) -> EngineHealth: ...

    async def drain(self, grace_s: float) -> int: ...


class Deadline:
    """A request's `timeout_ms`: when it runs out, the request is aborted in the engine (freeing its blocks
    at once, also while it waits for a slot) and its stream ends with a 504 at its next output."""

    def __init__(self, engine: ServedEngine, request_id: str, timeout_ms: int | None):
        self.expired = False
        self.message = f"the request did not finish within its deadline of {timeout_ms} ms"
        self._engine, self._request_id = engine, request_id
        self._timer = (asyncio.get_running_loop().call_later(timeout_ms / 1000, self._expire)
                       if timeout_ms is not None else None)

    def _expire(self) -> None:
        self.expired = True
        self._engine.abort(self._request_id)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves Generate / Session / Abort / GetLoad / GetModelInfo from one engine."""

    def __init__(self, engine: ServedEngine, model_info: ModelInfo):
        self._engine = engine
        self._model_info = model_info
        self._sessions: set[WorkerSession] = set()
        self._draining = False

    async def Generate(self, request, context) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async for response in self.responses(request, worker_pb2.GenerateResponse):
            yield response

    async def Session(self, request_iterator, context) -> None:
        if self._draining:  # a router reconnecting while this worker stops: refuse the session outright
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is shutting down")
        session = WorkerSession(self.responses)
        self._sessions.add(session)
        try:
            await session.run(request_iterator, context)
        finally:
            self._sessions.discard(session)

    def drain(self) -> None:
        """The worker is stopping: sessions refuse new requests (503) and end after their last one."""
        self._draining = True
        for session in self._sessions:
            session.drain()

    @property
    def draining(self) -> bool:
        return self._draining

    async def responses(self, request: worker_pb2.GenerateRequest,
                        new: ResponseFactory) -> AsyncIterator[worker_pb2.GenerateResponse]:
        """One request's responses, each filled into a fresh `new()` (a session adds them to its batch in
        place; per token, building a response and then copying it would cost as much again)."""
        rid = request.request_id
        try:
            if not rid or not request.prompt_token_ids:
                raise RequestRejected("request_id and a non-empty prompt_token_ids are required")
            params = params_from_request(request)
        except RequestRejected as exc:
            yield fill_error(new(), exc.message, exc.status)
            return
        deadline = Deadline(self._engine, rid, request.timeout_ms if request.HasField("timeout_ms") else None)
        try:
            async for response in self._stream(rid, request, params, new, deadline):
                yield response
        finally:
            deadline.cancel()

    async def _stream(self, rid: str, request: worker_pb2.GenerateRequest, params: SamplingParams,
                      new: ResponseFactory, deadline: "Deadline") -> AsyncIterator[worker_pb2.GenerateResponse]:
        finished = False
        try:
            async for response in self._engine_responses(rid, request, params, new, deadline):
                finished = response.WhichOneof("response") != "chunk"
                yield response
        finally:
            if not finished:  # the client cancelled (or the stream broke): free the request's blocks
                await self._abort(rid)

    async def _engine_responses(self, rid: str, request: worker_pb2.GenerateRequest, params: SamplingParams,
                                new: ResponseFactory,
                                deadline: "Deadline") -> AsyncIterator[worker_pb2.GenerateResponse]:
        prompt, output = list(request.prompt_token_ids), list(request.output_token_ids)
        try:
            async for out in self._engine.generate(rid, prompt, params, output):
                if deadline.expired:  # its abort ends the engine's stream; the request ends with the 504
                    yield fill_error(new(), deadline.message, 504)
                    return
                if out.new_token_ids or out.new_logprobs:
                    response = new()
                    fill_chunk(response.chunk, out)
                    yield response
                if out.finished:
                    response = new()
                    fill_final(response, out)
                    yield response
                    return
        except RequestRejected as exc:
            yield fill_error(new(), exc.message, exc.status)
            return
        except Exception as exc:  # noqa: BLE001 - every failure becomes an in-stream error
            log.exception("request %s failed", rid)
            yield fill_error(new(), str(exc) or type(exc).__name__, 500)
            return
        yield fill_error(new(), "engine ended the stream without finishing the request", 500)

    async def _abort(self, rid: str) -> bool:
        try:
            return self._engine.abort(rid)
        except Exception:  # noqa: BLE001 - abort is best effort
            log.exception("abort of %s failed", rid)
            return False

    async def Abort(self, request, context) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(aborted=await self._abort(request.request_id))

    async def GetLoad(self, request, context) -> worker_pb2.GetLoadResponse:
        load = self._engine.get_load()
        return worker_pb2.GetLoadResponse(num_running=load.num_running, num_waiting=load.num_waiting,
                                          kv_cache_usage=load.kv_cache_usage,
                                          prefix_cache_hit_rate=load.prefix_cache_hit_rate)

    async def GetModelInfo(self, request, context) -> worker_pb2.GetModelInfoResponse:
        info = self._model_info
        return worker_pb2.GetModelInfoResponse(
            model_name=info.model_name, context_length=info.context_length, vocab_size=info.vocab_size,
            stop_token_ids=list(info.stop_token_ids), tokenizer_id=info.tokenizer_id)


HEALTH_POLL_S = 0.2  # how often the gRPC health status follows the engine's


async def serve_worker(engine: ServedEngine, host: str, port: int, model_info: ModelInfo,
                       security: ServerSecurity | None = None) -> grpc.aio.Server:
    """Start a grpc.aio server with the Worker and grpc.health.v1.Health services; returns it started.
    With `security` the port speaks TLS and refuses unauthenticated calls; without, it is plaintext.

    The health status (service "" and k2serve.v1.Worker) follows `engine.health()`: SERVING only while
    the engine can generate, NOT_SERVING once it hangs, fails or drains.
    `port` 0 picks a free port: read it from `server.k2serve_port`. Stop with `stop_worker`.
    """
    server = grpc.aio.server(interceptors=security.interceptors() if security else None,
                             options=[("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    servicer = WorkerServicer(engine, model_info)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, security.credentials()) if security else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind the worker gRPC server to {host}:{port}")
    await server.start()
    await _set_health(health_servicer, True)
    server.k2serve_port = bound
    server.k2serve_servicer, server.k2serve_engine = servicer, engine
    server.k2serve_health = asyncio.create_task(_follow_health(server, engine, servicer, health_servicer))
    return server


async def stop_worker(server: grpc.aio.Server, grace_s: float) -> int:
    """Stop a server from serve_worker gracefully: health probes say NOT_SERVING, new requests are refused
    with statuses a router retries elsewhere, requests in flight get `grace_s` to finish and the rest end
    with a 503 (a router resumes them on another group). Returns how many were ended that way."""
    server.k2serve_servicer.drain()
    ended = await server.k2serve_engine.drain(grace_s)
    await server.stop(1.0)  # the ended streams' last responses are on their way
    return ended


async def _follow_health(server: grpc.aio.Server, engine: ServedEngine, servicer: WorkerServicer,
                         health_servicer: health.aio.HealthServicer) -> None:
    """Until the server stops: the health status follows the engine's and the servicer's draining."""
    serving = True
    while await server.wait_for_termination(HEALTH_POLL_S):  # True: timed out, still serving
        now = engine.health().is_serving and not servicer.draining
        if now != serving:
            log.warning("worker health: %s", "SERVING" if now else f"NOT_SERVING ({engine.health().reason})")
            await _set_health(health_servicer, now)
            serving = now


async def _set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
