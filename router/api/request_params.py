"""Request -> GenerateParams: the request id, sampling parameters and the limits every API endpoint checks."""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from starlette.requests import Request

from k2serve.router.errors import APIError
from k2serve.router.context import RouterContext
from k2serve.router.pool.worker import GenerateParams, GuidedRequest


def request_id(request: Request) -> str:
    """The client's x-request-id (sanitized) or a fresh one."""
    rid = request.headers.get("x-request-id", "")
    return rid[:128] if rid and rid.isprintable() else os.urandom(16).hex()  # uuid4().hex's form without a UUID object


TIMEOUT_HEADER = "x-request-timeout"


def request_deadline(ctx: RouterContext, request: Request) -> float:
    """When the request must be done (time.monotonic()): now plus the client's x-request-timeout (seconds),
    at most the configured max_request_timeout_s; 400 when the header is not a positive number."""
    limit = ctx.config.max_request_timeout_s
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        try:
            asked = float(header)
        except ValueError:
            asked = float("nan")
        if not 0 < asked < float("inf"):
            raise APIError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got {header[:40]!r}")
        limit = min(limit, asked)
    return time.monotonic() + limit


def check_schema(schema: Any, param: str) -> None:
    """400 unless `schema` is a valid JSON schema object."""
    import jsonschema

    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise APIError(400, f"{param} is not a valid JSON schema: {exc.message}", param=param) from None
    except RecursionError:
        raise APIError(400, f"{param} is nested too deeply", param=param) from None


def sampling_params(ctx: RouterContext, req, rid: str, prompt_ids: Sequence[int], max_tokens: int,
                    index: int, guided: GuidedRequest | None = None, logprobs: int | None = None,
                    temperature: float | None = None) -> GenerateParams:
    """GenerateParams for choice `index` of a request (seed + index keeps n choices distinct)."""
    cfg = ctx.config
    temperature = temperature if temperature is not None else cfg.default_temperature
    return GenerateParams(
        request_id=rid if index == 0 else f"{rid}-{index}", prompt_token_ids=tuple(prompt_ids),
        temperature=temperature,
        top_p=req.top_p if req.top_p is not None else cfg.default_top_p,
        top_k=getattr(req, "top_k", None), min_p=getattr(req, "min_p", None), max_tokens=max_tokens,
        min_tokens=getattr(req, "min_tokens", None), presence_penalty=getattr(req, "presence_penalty", None),
        frequency_penalty=getattr(req, "frequency_penalty", None),
        repetition_penalty=getattr(req, "repetition_penalty", None),
        seed=_int64(req.seed + index) if getattr(req, "seed", None) is not None else None,
        ignore_eos=getattr(req, "ignore_eos", None), logprobs=logprobs, guided=guided)


def _int64(value: int) -> int:
    """`value` wrapped into int64 (seed + choice index may pass the top of the seed's range)."""
    return (value + 2 ** 63) % 2 ** 64 - 2 ** 63


def check_common(ctx: RouterContext, n: int, stops: Sequence[str], top_logprobs: int | None) -> None:
    """400 when n, the stop strings or top_logprobs exceed the configured limits."""
    cfg = ctx.config
    if n > cfg.max_n:
        raise APIError(400, f"n must be at most {cfg.max_n}, got {n}", param="n")
    if len(stops) > cfg.max_stop_strings:
        raise APIError(400, f"at most {cfg.max_stop_strings} stop strings are supported", param="stop")
    if top_logprobs is not None and top_logprobs > cfg.max_top_logprobs:
        raise APIError(400, f"top_logprobs must be at most {cfg.max_top_logprobs}", param="top_logprobs")
