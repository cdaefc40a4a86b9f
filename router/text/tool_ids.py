"""Normalize tool-call ids in a chat history to K2's `functions.NAME:IDX` form (docs/k2-format.md, Tool calls).

K2 numbers its tool calls across the whole conversation. Histories from other models or clients carry
ids like `call_abc123`; rendered verbatim they make K2 emit malformed ids. Before rendering, every
assistant tool-call id that is not exactly `functions.{its name}:{digits}` is rewritten to
`functions.{name}:{idx}`, and the tool messages answering it get the same new `tool_call_id`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

from k2serve.router.errors import APIError

_K2_ID = re.compile(r"functions\.(?P<name>.+):(?P<idx>\d+)")

Message = Mapping[str, Any]


def is_k2_tool_call_id(call_id: Any, name: str) -> bool:
    """True when `call_id` is `functions.{name}:{digits}`."""
    match = _K2_ID.fullmatch(call_id) if isinstance(call_id, str) else None
    return bool(match) and match.group("name") == name


def normalize_tool_call_ids(messages: Iterable[Message]) -> list[dict]:
    """Return a copy of the OpenAI-shaped `messages` with K2-form tool-call ids (input untouched).

    Indices count tool calls across the conversation; an id already in K2 form is kept (and later
    rewritten ids never reuse it). A tool message's `tool_call_id` follows the rewrite of the most
    recent assistant call that carried that id.
    """
    return _Renumbering(messages).messages


def next_tool_call_index(messages: Iterable[Message]) -> int:
    """The index K2 should give the next tool call in this conversation."""
    return _Renumbering(messages).next_index


class _Renumbering:
    """One pass over a history: rewrite ids, remember the mapping, count calls."""

    def __init__(self, messages: Iterable[Message]) -> None:
        messages = [copy.deepcopy(dict(m)) for m in messages]
        self._taken = {c.get("id") for m in messages for c in _calls(m)
                       if is_k2_tool_call_id(c.get("id"), _name(c))}
        self._renamed: dict[Any, str] = {}
        self.next_index = 0
        for position, message in enumerate(messages):
            self._visit(position, message)
        self.messages = messages

    def _visit(self, position: int, message: dict) -> None:
        if message.get("role") == "tool" and message.get("tool_call_id") in self._renamed:
            message["tool_call_id"] = self._renamed[message["tool_call_id"]]
        for k, tool_call in enumerate(_calls(message)):
            name = _name(tool_call)
            if not name:
                raise APIError(400, f"messages[{position}].tool_calls[{k}] has no function name", param="messages")
            self._renumber(tool_call, name)

    def _renumber(self, tool_call: dict, name: str) -> None:
        old_id = tool_call.get("id")
        if is_k2_tool_call_id(old_id, name):
            self.next_index = max(self.next_index, int(old_id.rpartition(":")[2]) + 1)
            self._renamed.pop(old_id, None)
            return
        new_id = f"functions.{name}:{self.next_index}"
        while new_id in self._taken:
            self.next_index += 1
            new_id = f"functions.{name}:{self.next_index}"
        self.next_index += 1
        self._taken.add(new_id)
        tool_call["id"] = new_id
        if old_id is not None:
            self._renamed[old_id] = new_id


def _calls(message: Mapping[str, Any]) -> list[dict]:
    if message.get("role") != "assistant":
        return []
    return list(message.get("tool_calls") or [])


def _name(tool_call: Mapping[str, Any]) -> str:
    function = tool_call.get("function") or {}
    return function.get("name") or "" if isinstance(function, Mapping) else ""
