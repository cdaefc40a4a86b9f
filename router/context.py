"""RouterContext: what every request handler works with (one per app, on `app.state.ctx`; no globals)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import AsyncIterator

from k2serve.router.config import RouterConfig
from k2serve.router.drain import Drain
from k2serve.router.errors import APIError
from k2serve.router.generation.choice import run_choice
from k2serve.router.generation.events import ChoiceSpec, Event
from k2serve.router.metrics import RouterMetrics
from k2serve.router.pool.group_pool import WorkerPool
from k2serve.router.pool.worker import GenerateParams, WorkerModelInfo
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.text.tokenizer import K2Tokenizer


@dataclass
class RouterContext:
    """The router's settings, its worker pool, tokenizer and chat template, and the served model's facts."""

    config: RouterConfig
    pool: WorkerPool
    tokenizer: K2Tokenizer
    template: ChatTemplate
    metrics: RouterMetrics | None = None
    model_info: WorkerModelInfo | None = None  # asked of the workers on first use
    drain: Drain = field(default_factory=Drain)  # the shutdown state (router/drain.py)

    async def ensure_model_info(self) -> WorkerModelInfo:
        """The served model's info, asked of the workers once; 503 while none answers."""
        if self.model_info is None:
            self.model_info = await self.pool.model_info()
        if self.model_info is None:
            raise APIError(503, "no worker is available to serve the model")
        return self.model_info

    @property
    def model_name(self) -> str:
        return self.config.model_name or self.model_info.model_name

    async def check_model(self, requested: str) -> None:
        """404 unless `requested` names the served model."""
        await self.ensure_model_info()
        if requested != self.model_name:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"`{self.model_name}`", param="model", code="model_not_found")

    def render_prompt(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        """Chat template + tokenizer -> prompt ids; a template failure is the client's 400."""
        try:
            return self.template.encode(self.tokenizer, messages, tools=tools, add_generation_prompt=True)
        except ValueError as exc:
            raise APIError(400, f"cannot render the conversation: {exc}", param="messages") from None

    def max_tokens_for(self, num_prompt: int, requested: int | None) -> int:
        """max_tokens within the context: default fills it; 400 when the prompt plus it does not fit."""
        context = self.model_info.context_length
        if requested is None:
            requested = context - num_prompt
            if requested < 1:
                raise APIError(400, f"The prompt has {num_prompt} tokens, which fills the model's "
                                    f"context of {context} tokens", param="messages",
                               code="context_length_exceeded")
        if num_prompt + requested > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, but "
                                f"{num_prompt} prompt tokens plus max_tokens {requested} were requested",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def run_choices(self, params: list[GenerateParams], spec: ChoiceSpec,
                    deadline: float | None = None) -> list[AsyncIterator[Event]]:
        """One event stream per choice, each sent to the worker pool when it is first iterated; `deadline`
        (time.monotonic()) applies to every choice."""
        return [run_choice(self.pool.generate(dataclasses.replace(p, deadline=deadline)), self.tokenizer, spec,
                           self.metrics) for p in params]
