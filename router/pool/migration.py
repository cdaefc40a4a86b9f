"""Migration: a request's progress across the worker groups that serve it, and when it may move on.

A group can fail while it streams a request (its process dies, the connection resets, a collective times
out, its drain deadline passes, or it hangs and is found unhealthy). The pool then re-sends the request to
another group as a continuation: the same prompt and sampling settings, with the tokens already streamed
to the client as `output_token_ids` (GenerateParams). The new group re-prefills prompt + those tokens (its
prefix cache makes that cheap when it has seen the prompt) and goes on as if it had generated them: they
count toward max_tokens and min_tokens, its penalties and structured-output grammar see them, and the
stream the router's text layers consume simply continues, so the detokenizer, stop strings and tool-call
parser keep their state and the client sees neither an error nor a repeated or missing token.

What stays exact:
* Greedy requests produce the tokens an uninterrupted run would (the groups compute the same logits).
* A seeded request draws its token at step k from a generator seeded with (seed, k) (the worker's
  sampler), and a continuation starts at step len(output_token_ids): it draws exactly what the first group
  would have drawn, given the same logits on the same kind of device. An unseeded request continues from
  another random stream, which samples the same distribution.
* Usage: prompt_tokens is the original prompt's, completion_tokens counts every streamed token once,
  cached_tokens is what the first group served from its prefix cache (the re-prefill of a migration is
  the router's cost, not the client's).

Tokens sent before the failure and received after it are never lost: a token reaches this object only when
the client's stream takes it, and the continuation carries exactly those.
"""

from __future__ import annotations

import dataclasses
from array import array

from pydantic import BaseModel, ConfigDict, Field

from k2serve.router.pool.worker import GenerateParams, StreamItem, TokenChunk


class MigrationConfig(BaseModel):
    """How often one request may move to another worker group."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(3, ge=1, description="Groups tried per request before its first token (1: no retry)")
    max_migrations: int = Field(3, ge=0, description="Times one request may move to another group after its "
                                "group failed mid-stream (0: the stream ends with the error)")
    stall_timeout_s: float = Field(5.0, gt=0, description="An unhealthy group that sent nothing for this long "
                                   "while serving requests is hung: its requests migrate")


class Progress:
    """One request's stream so far: the tokens its client received, and the groups that failed it."""

    __slots__ = ("params", "output", "cached_tokens", "failed", "migrations")

    def __init__(self, params: GenerateParams):
        self.params = params
        self.output = array("i")  # 4 bytes a token: a request in flight may hold up to its context
        self.cached_tokens: int | None = None  # the first group's count (None: nothing received yet)
        self.failed: list[tuple[str, int]] = []  # (group name, generation) of each failed attempt
        self.migrations = 0

    @property
    def started(self) -> bool:
        """Whether the client has received tokens (a failure now is a migration, not a retry)."""
        return len(self.output) > 0

    def next_params(self) -> GenerateParams:
        """What the next group is sent: the request, continued after the tokens already streamed."""
        if not self.output:
            return self.params
        return dataclasses.replace(self.params, output_token_ids=tuple(self.output))

    def record(self, item: StreamItem) -> StreamItem:
        """Note an item the client is about to receive; returns it with the first group's cached count."""
        if self.cached_tokens is None:
            self.cached_tokens = item.cached_tokens
        if isinstance(item, TokenChunk):
            self.output.extend(item.token_ids)
        if item.cached_tokens != self.cached_tokens:
            return dataclasses.replace(item, cached_tokens=self.cached_tokens)
        return item

    def may_try_again(self, config: MigrationConfig) -> bool:
        """Whether another group may take the request after one more failure."""
        if self.started:
            return self.migrations < config.max_migrations
        return len(self.failed) + 1 < config.max_attempts

    def failed_on(self, group: str, generation: int) -> None:
        """The group (this generation of it) failed the request; the next attempt goes elsewhere."""
        self.failed.append((group, generation))
        if self.started:
            self.migrations += 1

    def excluded(self, generations: dict[str, int]) -> list[str]:
        """Groups the next attempt must avoid: those that failed it and have not been replaced since."""
        return [name for name, generation in self.failed if generations.get(name) == generation]
