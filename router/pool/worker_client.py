"""WorkerClient: the router's gRPC client for one worker group (k2serve.v1.Worker), a `Worker`.

Protobuf objects stay in the gRPC modules (here and worker_session.py on the router's side): callers
pass and receive the plain dataclasses of worker.py. Cancelling the consumer of `generate` (closing the
iterator or cancelling its task) aborts the request on the worker, which frees its blocks.
"""

from __future__ import annotations

import json
import time
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2serve.v1 import worker_pb2, worker_pb2_grpc
from k2serve.router.pool.worker import (Finished, GenerateParams, GuidedRequest, StreamItem, TokenChunk, TokenLogprob,
                                       WorkerError, WorkerLoad, WorkerModelInfo)
from k2serve.router.pool.security import ClientSecurity
from k2serve.router.pool.worker_session import RequestMux

SERVICE_NAME = "k2serve.v1.Worker"
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "seed", "ignore_eos", "logprobs")
_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


def request_to_proto(params: GenerateParams) -> worker_pb2.GenerateRequest:
    """GenerateParams -> GenerateRequest, setting only the sampling fields that are not None; a deadline
    travels as the time left (timeout_ms)."""
    sampling = worker_pb2.SamplingParams(stop_token_ids=list(params.stop_token_ids))
    for name in _SAMPLING:
        value = getattr(params, name)
        if value is not None:
            setattr(sampling, name, value)
    req = worker_pb2.GenerateRequest(request_id=params.request_id,
                                     prompt_token_ids=list(params.prompt_token_ids), sampling=sampling,
                                     output_token_ids=list(params.output_token_ids))
    if params.guided is not None:
        req.guided.CopyFrom(_guided_to_proto(params.guided))
    if params.deadline is not None:  # the time left now: router and worker share no clock
        req.timeout_ms = max(1, min(2 ** 32 - 1, round((params.deadline - time.monotonic()) * 1000)))
    return req


def _guided_to_proto(g: GuidedRequest) -> worker_pb2.GuidedSpec:
    if g.kind == "json_schema":
        return worker_pb2.GuidedSpec(json_schema=g.json_schema)
    if g.kind == "json_object":
        return worker_pb2.GuidedSpec(json_object=True)
    if g.kind == "regex":
        return worker_pb2.GuidedSpec(regex=g.regex)
    if g.kind == "tool_call":
        guide = worker_pb2.ToolCallGuide(tools_json=json.dumps(list(g.tools), separators=(",", ":")),
                                         mode=g.mode, name=g.name, first_index=g.first_index)
        return worker_pb2.GuidedSpec(tool_call=guide)
    raise ValueError(f"unknown guided kind {g.kind!r}")


def response_from_proto(resp: worker_pb2.GenerateResponse) -> StreamItem:
    """GenerateResponse -> TokenChunk | Finished; an in-stream error raises WorkerError."""
    kind = resp.WhichOneof("response")
    if kind == "chunk":
        c = resp.chunk
        logprobs = tuple(TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
                         for lp in c.logprobs) if c.logprobs else ()  # per token: skip the empty generator
        return TokenChunk(tuple(c.token_ids), logprobs, c.prompt_tokens, c.completion_tokens, c.cached_tokens)
    if kind == "complete":
        d = resp.complete
        stop = d.matched_stop_token_id if d.HasField("matched_stop_token_id") else None
        return Finished(d.finish_reason, stop, d.prompt_tokens, d.completion_tokens, d.cached_tokens)
    if kind == "error":
        raise WorkerError(resp.error.message, resp.error.status or 500)
    raise WorkerError("worker sent an empty GenerateResponse", 500)


def _rpc_error(exc: grpc.aio.AioRpcError) -> WorkerError:
    status = 503 if exc.code() in _UNAVAILABLE else 500
    return WorkerError(f"worker {exc.code().name.lower()}: {exc.details()}", status)


def _session_error(exc: grpc.aio.AioRpcError | None, reason: str) -> WorkerError:
    return _rpc_error(exc) if exc is not None else WorkerError(reason, 503)


class WorkerClient:
    """A gRPC channel (with keepalive) to one worker group: TLS with `security`'s credentials, else plaintext.

    The channel opens on first use, inside the event loop that uses it (grpc.aio channels belong to
    one loop), so a client may be built before the router's server loop starts. `generate` sends every
    request over one multiplexed Session call (router/pool/worker_session.py), reopened after a failure;
    a request whose consumer leaves more than `max_buffered_responses` responses untaken is cancelled.
    """

    def __init__(self, address: str, security: ClientSecurity | None = None, max_buffered_responses: int = 1024):
        self.address = address
        self.security = security
        self.max_buffered_responses = max_buffered_responses
        self._channel: grpc.aio.Channel | None = None
        self._mux: RequestMux | None = None

    def _open(self) -> None:
        if self._channel is None:
            options = list(KEEPALIVE_OPTIONS)
            self._channel = (self.security.grpc_channel(self.address, options) if self.security is not None
                             else grpc.aio.insecure_channel(self.address, options=options))
            self._stub = worker_pb2_grpc.WorkerStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)

    async def generate(self, params: GenerateParams) -> AsyncIterator[StreamItem]:
        """Stream TokenChunks then one Finished; raises WorkerError on an in-stream or transport error."""
        self._open()
        if self._mux is None or self._mux.closed:
            self._mux = RequestMux(self._stub, _session_error, self.max_buffered_responses)
        stream = self._mux.generate(request_to_proto(params), params.deadline)
        try:
            async for resp in stream:
                item = response_from_proto(resp)
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            await stream.aclose()  # leaving early aborts the request on the worker

    async def abort(self, request_id: str, timeout: float = 5.0) -> bool:
        """Abort a request by id; True if the worker knew it."""
        resp = await self._unary("Abort", worker_pb2.AbortRequest(request_id=request_id), timeout)
        return resp.aborted

    async def get_load(self, timeout: float = 5.0) -> WorkerLoad:
        """The worker's current load."""
        r = await self._unary("GetLoad", worker_pb2.GetLoadRequest(), timeout)
        return WorkerLoad(r.num_running, r.num_waiting, r.kv_cache_usage, r.prefix_cache_hit_rate)

    async def get_model_info(self, timeout: float = 10.0) -> WorkerModelInfo:
        """Static facts about the served model."""
        r = await self._unary("GetModelInfo", worker_pb2.GetModelInfoRequest(), timeout)
        return WorkerModelInfo(r.model_name, r.context_length, r.vocab_size, tuple(r.stop_token_ids), r.tokenizer_id)

    async def health(self, timeout: float = 2.0) -> bool:
        """True when the worker's grpc.health.v1 status is SERVING."""
        self._open()
        try:
            r = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        """Close the session and the channel."""
        mux, channel, self._mux, self._channel = self._mux, self._channel, None, None
        try:
            if mux is not None:
                await mux.close()
        finally:
            if channel is not None:
                await channel.close()

    async def _unary(self, name: str, request, timeout: float):
        self._open()
        try:
            return await getattr(self._stub, name)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from exc
