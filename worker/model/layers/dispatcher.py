"""MoE token dispatchers: how token copies reach the rank that owns their expert, and come back.

`Dispatcher.forward(x, topk_ids, topk_weights, experts)` takes this rank's tokens ([n, H] with their
routing) and returns their routed-expert output ([n, H]). Registered implementations:
  local      world size 1: every expert is here.
  all_to_all exchange per-destination counts, all_to_all_single the copies to their experts'
             owners, run local experts, all_to_all_single the results back, weight and sum.
  all_gather baseline: all-gather every rank's tokens, run local experts on the copies routed
             here, reduce-scatter the weighted sums back to the token shards.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from k2serve.worker.model.layers.experts import LocalExperts
from k2serve.worker.model.layers.moe_stats import MoEStats
from k2serve.worker.parallel import ParallelInfo


class Dispatcher:
    name = "base"

    def __init__(self, info: ParallelInfo, stats: MoEStats | None = None):
        self.info, self.stats = info, stats

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        raise NotImplementedError


def weighted_sum(outputs: torch.Tensor, token_of_copy: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Sum each token's expert outputs [N, H] weighted by [N] into [n, H] (in float32, then cast)."""
    y = torch.zeros(n, outputs.shape[1], dtype=torch.float32)
    y.index_add_(0, token_of_copy, outputs.float() * weights[:, None])
    return y.to(outputs.dtype)


class LocalDispatcher(Dispatcher):
    name = "local"

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        n, k = topk_ids.shape
        token_of_copy = torch.arange(n).repeat_interleave(k)
        flat_ids = topk_ids.reshape(-1)
        outputs = experts(x[token_of_copy], flat_ids - experts.first_expert)
        return weighted_sum(outputs, token_of_copy, topk_weights.reshape(-1), n)


class AllToAllDispatcher(Dispatcher):
    name = "all_to_all"

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        n, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids // experts.n_local_experts, stable=True)  # copies grouped by owner
        token_of_copy = torch.arange(n).repeat_interleave(k)[order]
        send_ids = flat_ids[order]
        send_counts = torch.bincount(send_ids // experts.n_local_experts, minlength=self.info.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.info.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        start = time.perf_counter()
        recv_ids = self.exchange(send_ids, recv_splits, send_splits)
        recv_x = self.exchange(x[token_of_copy], recv_splits, send_splits)  # [N_recv, H]
        self.record("dispatch", start, send_splits, x)
        outputs = experts(recv_x, recv_ids - experts.first_expert)
        start = time.perf_counter()
        back = self.exchange(outputs, send_splits, recv_splits)  # [n * k, H] in `order`
        self.record("combine", start, recv_splits, outputs)
        return weighted_sum(back, token_of_copy, topk_weights.reshape(-1)[order], n)

    def exchange(self, t: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=self.info.group)
        return out

    def record(self, phase: str, start: float, splits: list[int], rows: torch.Tensor) -> None:
        """Time and bytes this rank sent to other ranks (rows to itself stay local)."""
        if self.stats is not None:
            remote = sum(splits) - splits[self.info.rank]
            self.stats.record_exchange(phase, time.perf_counter() - start, remote * rows.shape[1] * rows.element_size())


class AllGatherDispatcher(Dispatcher):
    name = "all_gather"

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        w = self.info.world_size
        all_x, all_ids, all_w = (self.gather(t) for t in (x, topk_ids, topk_weights))  # [W * n, ...]
        n_all, k = all_ids.shape
        flat = all_ids.reshape(-1)
        mine = (flat >= experts.first_expert) & (flat < experts.first_expert + experts.n_local_experts)
        token_of_copy = torch.arange(n_all).repeat_interleave(k)[mine]
        outputs = experts(all_x[token_of_copy], flat[mine] - experts.first_expert)
        partial = weighted_sum(outputs, token_of_copy, all_w.reshape(-1)[mine], n_all).contiguous()
        out = partial.new_empty(n_all // w, partial.shape[1])
        dist.reduce_scatter_tensor(out, partial, group=self.info.group)
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty((t.shape[0] * self.info.world_size,) + tuple(t.shape[1:]))
        dist.all_gather_into_tensor(out, t.contiguous(), group=self.info.group)
        return out


DISPATCHERS = {cls.name: cls for cls in (LocalDispatcher, AllToAllDispatcher, AllGatherDispatcher)}


def make_dispatcher(name: str, info: ParallelInfo, stats: MoEStats | None = None) -> Dispatcher:
    """The dispatcher registered as `name`; a single rank always dispatches locally."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown MoE dispatcher {name!r}; choose one of {sorted(DISPATCHERS)}")
    return LocalDispatcher(info, stats) if info.is_single else DISPATCHERS[name](info, stats)
