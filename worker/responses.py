"""Filling GenerateResponses from the engine's RequestOutputs, in place.

Responses are filled into messages the caller provides (a fresh one for a Generate stream, one added to
the batch for a Session): per token, building a message and then copying it into its container would
cost as much again.
"""

from __future__ import annotations

from typing import Callable

from k2serve.v1 import worker_pb2
from k2serve.worker.request import RequestOutput

ResponseFactory = Callable[[], worker_pb2.GenerateResponse]


def fill_chunk(chunk: worker_pb2.GenerateChunk, out: RequestOutput) -> None:
    """An output's new tokens, logprobs and cumulative counts."""
    chunk.token_ids.extend(out.new_token_ids)
    chunk.prompt_tokens, chunk.completion_tokens = out.prompt_tokens, out.completion_tokens
    chunk.cached_tokens = out.cached_tokens
    for lp in out.new_logprobs or ():
        top = [worker_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top_logprobs]
        chunk.logprobs.append(worker_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=top))


def fill_final(response: worker_pb2.GenerateResponse, out: RequestOutput) -> None:
    """The last output: `complete`, or `error` when the engine failed the request."""
    if out.finish_reason == "error":
        fill_error(response, out.error or "the engine failed this request", out.error_status)
        return
    done = response.complete
    done.finish_reason = out.finish_reason or "stop"
    done.prompt_tokens, done.completion_tokens = out.prompt_tokens, out.completion_tokens
    done.cached_tokens = out.cached_tokens
    if out.stop_token_id is not None:
        done.matched_stop_token_id = out.stop_token_id


def fill_error(response: worker_pb2.GenerateResponse, message: str, status: int) -> worker_pb2.GenerateResponse:
    """An in-stream error with an HTTP-like status (the stream's last response)."""
    response.error.message, response.error.status = message, status
    return response
