"""Sampler: turns one step's logits into a token per request, applying each request's parameters.

Order per row: raw logprobs (for reporting) -> repetition / presence / frequency penalties -> logit_bias
-> guided mask -> min_tokens ban of stop ids -> greedy argmax, or temperature, top_k, top_p, min_p and a
draw. Reported logprobs are the RAW model distribution (log_softmax of the logits before any of the
above), as vLLM v1 reports by default. Seeded requests draw with a generator seeded from
(seed, number of tokens generated so far), so their output does not depend on what else is in the batch
or on preemption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from k2serve.worker.request import Request, SamplingParams, TokenLogprob

_SEED_STRIDE = 0x9E3779B97F4A7C15  # mixes the step into the seed (golden-ratio constant)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Samples one token per row of `logits` for the matching request."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # per device; unseeded requests share it

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: Sequence[Request],
                 apply_guided: Callable[[torch.Tensor], None] | None = None) -> SamplerOutput:
        """logits [N, V] float32 (modified in place); `apply_guided` masks disallowed tokens to -inf."""
        logits = logits.float()  # [N, V]
        raw = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs for r in requests) else None
        self._apply_penalties(logits, requests)
        self._apply_logit_bias(logits, requests)
        if apply_guided is not None:
            apply_guided(logits)
        self._ban_stop_ids_before_min_tokens(logits, requests)
        token_ids = self._choose(logits, requests)
        logprobs = [self._logprob(raw, i, t, r.params) for i, (t, r) in enumerate(zip(token_ids, requests))]
        return SamplerOutput(token_ids, logprobs)

    # ---- logit processors ----

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> None:
        for i, r in enumerate(requests):
            p = r.params
            if p.repetition_penalty != 1.0:
                # over prompt + output, as HF and vLLM do
                seen = torch.tensor(sorted(set(r.token_ids)), dtype=torch.long, device=logits.device)
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and r.num_output_tokens:
                out = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)  # [V]
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> None:
        for i, r in enumerate(requests):
            if r.params.logit_bias:
                ids = torch.tensor([int(k) for k in r.params.logit_bias], dtype=torch.long, device=logits.device)
                bias = list(r.params.logit_bias.values())
                logits[i, ids] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)

    @staticmethod
    def _ban_stop_ids_before_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> None:
        for i, r in enumerate(requests):
            if r.num_output_tokens < r.params.min_tokens and r.stop_ids:
                ids = torch.tensor(sorted(r.stop_ids), dtype=torch.long, device=logits.device)
                saved = logits[i, ids].clone()
                logits[i, ids] = -float("inf")
                if torch.isneginf(logits[i]).all():  # a grammar that can only stop: let it
                    logits[i, ids] = saved

    # ---- choosing ----

    def _choose(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        chosen = logits.argmax(dim=-1)  # [N] greedy for every row; sampled rows overwritten below
        rows = [i for i, r in enumerate(requests) if not r.params.is_greedy]
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
            probs = self._filtered_probs(logits[idx], [requests[i].params for i in rows])  # [S, V]
            noise = self._exponential_noise(probs, [requests[i] for i in rows])  # [S, V]
            chosen[idx] = (probs / noise).argmax(dim=-1)
        return chosen.tolist()

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax after temperature, top_k, top_p and min_p, per row ([S, V] -> [S, V])."""
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=logits.device)  # [S]
        logits = logits / temps[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            logits = _top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)  # [S, V]
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=probs.device)[:, None]  # [S, 1]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs

    def _exponential_noise(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Exponential(1) noise like `probs`; argmax(p / noise) is a draw from p (the Gumbel-max trick's twin)."""
        device = probs.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        noise = torch.empty_like(probs).exponential_(generator=self._generators[device])  # [S, V]
        for j, r in enumerate(requests):
            if r.params.seed is not None:
                noise[j].exponential_(generator=request_generator(r.params.seed, r.num_output_tokens, device))
        return noise.clamp_min_(1e-20)

    @staticmethod
    def _logprob(raw: torch.Tensor | None, i: int, token_id: int, p: SamplingParams) -> TokenLogprob | None:
        if raw is None or not p.logprobs:
            return None
        top = []
        if p.top_logprobs:
            values, ids = raw[i].topk(p.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token_id, raw[i, token_id].item(), top)


def request_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one seeded request at one step: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed((seed * _SEED_STRIDE + step) % (1 << 63))


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask to -inf what falls outside each row's top_k and top_p nucleus ([S, V] -> [S, V])."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V]
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device).clamp(max=vocab)  # [S]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    drop = ranks >= ks.unsqueeze(1)  # [S, V]
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=logits.device).unsqueeze(1)  # [S, 1]
    probs = torch.softmax(sorted_logits.masked_fill(drop, -float("inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
    drop |= mass_before >= top_p  # the first token is always kept
    sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
