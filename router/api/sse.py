"""Server-sent event framing for the streaming APIs, with the per-token events pre-encoded.

Every streamed token becomes one SSE event, so encoding one is the router's commonest work of its own:

* the fields every chunk of an OpenAI stream repeats (id, object, created, model) are encoded once,
  in `OpenAIFrames`;
* a text delta without logprobs, the commonest event by far, is formatted around its JSON-escaped
  text; everything else goes through the encoder.

The output is byte for byte what the encoders below produce for the whole payload (the tests compare).
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring  # the string encoder JSONEncoder(ensure_ascii=False) uses
from typing import Any

OPENAI_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
ANTHROPIC_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps' spacing, without a new encoder per call
DONE = "data: [DONE]\n\n"


def sse(payload: Any) -> str:
    """One OpenAI `data:` event."""
    return f"data: {OPENAI_JSON.encode(payload)}\n\n"


class OpenAIFrames:
    """The `data:` events of one OpenAI stream, whose chunks all begin with the fields of `head`.

    `usage_on_every_chunk`: chat streams with `include_usage` send `"usage": null` on every chunk
    but the last.
    """

    def __init__(self, head: dict[str, Any], usage_on_every_chunk: bool = False):
        if not head:
            raise ValueError("OpenAIFrames needs the stream's id/object/created/model fields")
        self._prefix = "data: " + OPENAI_JSON.encode(head)[:-1] + ',"choices":'
        self._end = ',"usage":null}\n\n' if usage_on_every_chunk else "}\n\n"

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """`{**head, "choices": choices}` (plus `usage` when given) as one event."""
        body = self._prefix + OPENAI_JSON.encode(choices)
        if usage is not None:
            return body + ',"usage":' + OPENAI_JSON.encode(usage) + "}\n\n"
        return body + self._end

    def completion_text(self, index: int, text: str) -> str:
        """A completions chunk: choice `index` adds `text` (no logprobs, not finished)."""
        return (f'{self._prefix}[{{"index":{index:d},"text":{encode_basestring(text)},'
                f'"logprobs":null,"finish_reason":null}}]{self._end}')

    def chat_content(self, index: int, text: str) -> str:
        """A chat chunk: choice `index`'s delta adds content `text` (no logprobs, not finished)."""
        return (f'{self._prefix}[{{"index":{index:d},"delta":{{"content":{encode_basestring(text)}}},'
                f'"logprobs":null,"finish_reason":null}}]{self._end}')


def anthropic_event(kind: str, payload: dict[str, Any]) -> str:
    """One Anthropic event: `event: KIND` and `data: {"type": KIND, **payload}`."""
    return f"event: {kind}\ndata: {ANTHROPIC_JSON.encode({'type': kind, **payload})}\n\n"


def anthropic_text_delta(index: int, text: str) -> str:
    """`content_block_delta` adding `text` to the text block `index`."""
    return ('event: content_block_delta\ndata: {"type": "content_block_delta", '
            f'"index": {index:d}, "delta": {{"type": "text_delta", "text": {encode_basestring(text)}}}}}\n\n')
