"""WorkerServicer: the k2serve.v1.Worker gRPC service over an AsyncEngine (grpc.aio).

Protobuf objects live only here (and in router/worker_client.py): the servicer converts requests
into the engine's own SamplingParams / GuidedSpec and RequestOutputs back into GenerateResponses.

Error scheme (documented in worker.proto): an engine rejection or bad parameters end the stream
with one `GenerateResponse.error` carrying an HTTP-like status; the gRPC call itself ends OK.
A client that cancels the stream aborts the request, which frees its KV cache blocks.
The gRPC port is for workers and routers only: it has no authentication.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from k2serve.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "k2serve.v1.Worker"
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens",
                    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed",
                    "ignore_eos", "logprobs")


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the served model, answered by GetModelInfo."""

    model_name: str
    context_length: int
    vocab_size: int
    stop_token_ids: tuple[int, ...] = ()
    tokenizer_id: str = ""

    @classmethod
    def from_model_dir(cls, path: str | Path, model_name: str | None = None) -> "ModelInfo":
        """Read config.json, generation_config.json and tiktoken.model of a K2-format checkpoint."""
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        return cls(model_name=model_name or path.name,
                   context_length=int(config.get("max_position_embeddings", 0)),
                   vocab_size=int(config.get("vocab_size", 0)),
                   stop_token_ids=_stop_ids(path, config),
                   tokenizer_id=_tokenizer_id(path))


def _stop_ids(path: Path, config: dict) -> tuple[int, ...]:
    """eos ids from generation_config.json / config.json plus <|im_end|> (K2 stops on both)."""
    ids: list[int] = []
    gen_path = path / "generation_config.json"
    sources = [json.loads(gen_path.read_text())] if gen_path.exists() else []
    for src in sources + [config]:
        eos = src.get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    ids += _im_end_ids(path)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _im_end_ids(path: Path) -> list[int]:
    tok_path = path / "tokenizer_config.json"
    if not tok_path.exists():
        return []
    decoder = json.loads(tok_path.read_text()).get("added_tokens_decoder", {})
    return [int(i) for i, tok in decoder.items() if isinstance(tok, dict) and tok.get("content") == "<|im_end|>"]


def _tokenizer_id(path: Path) -> str:
    model = path / "tiktoken.model"
    return "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest() if model.exists() else ""


class GenerateRejected(Exception):
    """Bad request parameters found while converting a GenerateRequest (HTTP-like status 400)."""

    status = 400


def sampling_kwargs(msg: worker_pb2.SamplingParams) -> dict[str, Any]:
    """The explicitly set sampling fields of a proto message (unset = engine default)."""
    kwargs = {name: getattr(msg, name) for name in _SAMPLING_FIELDS if msg.HasField(name)}
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    return kwargs


def guided_kwargs(msg: worker_pb2.GuidedSpec) -> dict[str, Any]:
    """The guided-decoding constraint as plain keyword arguments for worker.request.GuidedSpec."""
    kind = msg.WhichOneof("kind")
    if kind == "tool_call":
        tc = msg.tool_call
        return {"tool_call": {"tools": json.loads(tc.tools_json or "[]"), "mode": tc.mode,
                              "name": tc.name or None, "first_index": tc.first_index}}
    return {kind: getattr(msg, kind)} if kind else {}


def _build(cls: type, kwargs: dict[str, Any]) -> Any:
    """Instantiate a dataclass, rejecting fields it does not know with a 400."""
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    unknown = sorted(set(kwargs) - known) if known is not None else []
    if unknown:
        raise GenerateRejected(f"unsupported sampling fields for this worker: {unknown}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise GenerateRejected(str(exc)) from exc


def params_from_request(request: worker_pb2.GenerateRequest) -> Any:
    """GenerateRequest -> the engine's SamplingParams (with its GuidedSpec when one is set)."""
    from worker.request import GuidedSpec, SamplingParams

    kwargs = sampling_kwargs(request.sampling)
    if request.HasField("guided") and request.guided.WhichOneof("kind"):
        kwargs["guided"] = _build(GuidedSpec, _guided_for(GuidedSpec, guided_kwargs(request.guided)))
    return _build(SamplingParams, kwargs)


def _guided_for(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Flatten the tool_call guide when GuidedSpec takes its fields directly."""
    tool_call = kwargs.get("tool_call")
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if tool_call is None or "tool_call" not in names or "tools" in names:
        return _flatten_tool_call(kwargs) if tool_call is not None else kwargs
    return kwargs


def _flatten_tool_call(kwargs: dict[str, Any]) -> dict[str, Any]:
    tc = kwargs["tool_call"]
    return {"tools": tc["tools"], "tool_choice": tc["mode"], "tool_name": tc["name"]}


def _attr(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


def chunk_from_output(out: Any) -> worker_pb2.GenerateChunk:
    """RequestOutput -> GenerateChunk (new tokens, logprobs, cumulative counts)."""
    chunk = worker_pb2.GenerateChunk(
        token_ids=list(_attr(out, "new_token_ids", "token_ids", default=[])),
        prompt_tokens=int(_attr(out, "num_prompt_tokens", "prompt_tokens", default=0)),
        completion_tokens=int(_attr(out, "num_output_tokens", "num_completion_tokens",
                                    "completion_tokens", default=0)),
        cached_tokens=int(_attr(out, "num_cached_tokens", "cached_tokens", default=0)))
    for lp in _attr(out, "logprobs", "new_logprobs", default=None) or []:
        chunk.logprobs.append(_token_logprob(lp))
    return chunk


def _token_logprob(lp: Any) -> worker_pb2.TokenLogprob:
    top = _attr(lp, "top", "top_logprobs", default=[]) or []
    msg = worker_pb2.TokenLogprob(token_id=int(_attr(lp, "token_id")), logprob=float(_attr(lp, "logprob")))
    for item in top:
        tid, val = (item if isinstance(item, (tuple, list)) else (_attr(item, "token_id"), _attr(item, "logprob")))
        msg.top.append(worker_pb2.TopLogprob(token_id=int(tid), logprob=float(val)))
    return msg


def complete_from_output(out: Any, chunk: worker_pb2.GenerateChunk) -> worker_pb2.GenerateComplete:
    """The last RequestOutput -> GenerateComplete."""
    done = worker_pb2.GenerateComplete(
        finish_reason=str(_attr(out, "finish_reason", default="stop") or "stop"),
        prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
        cached_tokens=chunk.cached_tokens)
    stop = _attr(out, "matched_stop_token_id", "stop_token_id", "matched_stop", default=None)
    if isinstance(stop, int):
        done.matched_stop_token_id = stop
    return done


def _error(message: str, status: int) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(error=worker_pb2.GenerateError(message=message, status=status))


def _rejection_status(exc: BaseException) -> int | None:
    """An engine rejection carries an HTTP-like status (`status` / `status_code` / `http_status`)."""
    status = _attr(exc, "status", "status_code", "http_status", default=None)
    return int(status) if isinstance(status, int) else None


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves Generate / Abort / GetLoad / GetModelInfo from one AsyncEngine."""

    def __init__(self, engine: Any, model_info: ModelInfo, params_factory=None):
        self._engine = engine
        self._model_info = model_info
        self._params_factory = params_factory or params_from_request

    async def Generate(self, request, context) -> AsyncIterator[worker_pb2.GenerateResponse]:
        rid = request.request_id
        if not rid:
            yield _error("request_id is required", 400)
            return
        if not request.prompt_token_ids:
            yield _error("prompt_token_ids must not be empty", 400)
            return
        try:
            params = self._params_factory(request)
        except GenerateRejected as exc:
            yield _error(str(exc), exc.status)
            return
        async for response in self._stream(rid, list(request.prompt_token_ids), params):
            yield response

    async def _stream(self, rid: str, prompt: list[int], params: Any) -> AsyncIterator[worker_pb2.GenerateResponse]:
        finished = False
        try:
            async for response in self._engine_responses(rid, prompt, params):
                finished = response.WhichOneof("response") != "chunk"
                yield response
        finally:
            if not finished:  # cancelled by the client (or failed): free the request's blocks
                await self._abort(rid)

    async def _engine_responses(self, rid, prompt, params) -> AsyncIterator[worker_pb2.GenerateResponse]:
        try:
            async for out in self._engine.generate(rid, prompt, params):
                chunk = chunk_from_output(out)
                if chunk.token_ids or chunk.logprobs:
                    yield worker_pb2.GenerateResponse(chunk=chunk)
                if _attr(out, "finished", default=False):
                    yield worker_pb2.GenerateResponse(complete=complete_from_output(out, chunk))
                    return
        except Exception as exc:  # noqa: BLE001 - every failure becomes an in-stream error
            status = _rejection_status(exc)
            if status is None:
                log.exception("request %s failed", rid)
            yield _error(str(exc) or type(exc).__name__, status or 500)
            return
        yield _error("engine ended the stream without finishing the request", 500)

    async def _abort(self, rid: str) -> bool:
        try:
            result = self._engine.abort(rid)
            result = await result if inspect.isawaitable(result) else result
        except Exception:  # noqa: BLE001 - abort is best effort
            log.exception("abort of %s failed", rid)
            return False
        return bool(result) if result is not None else True

    async def Abort(self, request, context) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(aborted=await self._abort(request.request_id))

    async def GetLoad(self, request, context) -> worker_pb2.GetLoadResponse:
        load = self._engine.get_load()
        load = await load if inspect.isawaitable(load) else load
        return worker_pb2.GetLoadResponse(
            num_running=int(_attr(load, "num_running", "running", default=0)),
            num_waiting=int(_attr(load, "num_waiting", "waiting", default=0)),
            kv_cache_usage=float(_attr(load, "kv_cache_usage", "kv_usage", default=0.0)),
            prefix_cache_hit_rate=float(_attr(load, "prefix_cache_hit_rate", "cache_hit_rate", default=0.0)))

    async def GetModelInfo(self, request, context) -> worker_pb2.GetModelInfoResponse:
        info = self._model_info
        return worker_pb2.GetModelInfoResponse(
            model_name=info.model_name, context_length=info.context_length, vocab_size=info.vocab_size,
            stop_token_ids=list(info.stop_token_ids), tokenizer_id=info.tokenizer_id)


async def serve_worker(engine: Any, host: str, port: int, model_info: ModelInfo,
                       params_factory=None) -> grpc.aio.Server:
    """Start a grpc.aio server with the Worker and grpc.health.v1.Health services; returns it started.

    `port` 0 picks a free port: read it from `server.k2serve_port`. Stop with `await server.stop(grace)`.
    """
    server = grpc.aio.server(options=[("grpc.keepalive_permit_without_calls", 1),
                                      ("grpc.http2.min_ping_interval_without_data_ms", 5000)])
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(engine, model_info, params_factory), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the worker gRPC server to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.k2serve_port = bound
    return server
