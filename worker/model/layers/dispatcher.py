"""MoE token dispatchers: how token copies reach the rank that owns their expert, and come back.

`Dispatcher.forward(x, topk_ids, topk_weights, experts)` takes this rank's tokens ([n, H] with their
routing) and returns their routed-expert output ([n, H]). Registered implementations:
  local      world size 1: every expert is here.
  all_to_all exchange the per-expert copy counts, all_to_all_single the copies to their experts'
             owners, run local experts, all_to_all_single the results back, weight and sum.
  all_gather baseline: all-gather every rank's tokens, run local experts on all of them (copies routed
             elsewhere are skipped), reduce-scatter the weighted sums back to the token shards.

Host synchronisation: all_to_all reads the exchanged counts back once per layer (the split sizes the
collectives need, which also give the experts their per-expert counts); the others read nothing back
(dense CPU experts count their copies themselves, once).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from k2serve.worker.model.layers.experts import LocalExperts, weighted_sum
from k2serve.worker.model.layers.moe_stats import MoELayerStats, expert_histogram
from k2serve.worker.parallel import ParallelInfo


class Dispatcher:
    name = "base"

    def __init__(self, info: ParallelInfo, stats: MoELayerStats):
        self.info, self.stats = info, stats

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    name = "local"

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        return experts(x, topk_ids, topk_weights)


class AllToAllDispatcher(Dispatcher):
    name = "all_to_all"

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        n, k = topk_ids.shape
        n_local, world = experts.n_local_experts, self.info.world_size
        flat_ids = topk_ids.reshape(-1)  # [n * k]
        order = torch.argsort(flat_ids, stable=True)  # copies grouped by expert, hence by owner
        send_counts = expert_histogram(flat_ids, n_local * world)  # [E] copies per expert
        recv_counts = torch.empty_like(send_counts)  # [W * n_local]: per source rank, per local expert
        dist.all_to_all_single(recv_counts, send_counts, group=self.info.group)
        counts = torch.cat([send_counts, recv_counts]).tolist()  # the layer's one host synchronisation
        send_splits = [sum(counts[r * n_local:(r + 1) * n_local]) for r in range(world)]
        received = [counts[n_local * world + r * n_local:][:n_local] for r in range(world)]  # [W][n_local]
        recv_splits = [sum(row) for row in received]
        recv_x = self.exchange("dispatch", x[order // k], recv_splits, send_splits)  # [N_recv, H]
        # Copies arrive per source, each source's sorted by expert: their experts follow from the counts.
        local_ids = torch.arange(n_local, device=x.device).repeat(world)  # [W * n_local]
        recv_ids = torch.repeat_interleave(local_ids, recv_counts, output_size=recv_x.shape[0])
        ones = torch.ones(recv_x.shape[0], 1, dtype=torch.float32, device=x.device)
        per_expert = [sum(col) for col in zip(*received)]
        outputs = experts(recv_x, (recv_ids + experts.first_expert)[:, None], ones, per_expert)
        back = self.exchange("combine", outputs, send_splits, recv_splits)  # [n * k, H] in `order`
        return weighted_sum(back, order // k, topk_weights.reshape(-1)[order], n)

    def exchange(self, phase: str, t: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """all_to_all_single of rows; records the bytes sent to other ranks (and the time, when timed)."""
        out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
        started = self.stats.start_timer()
        dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=self.info.group)
        stopped = self.stats.stop_timer(started)
        remote = sum(in_splits) - in_splits[self.info.rank]
        self.stats.record_exchange(phase, remote * math.prod(t.shape[1:]) * t.element_size(), started, stopped)
        return out


class AllGatherDispatcher(Dispatcher):
    name = "all_gather"

    def forward(self, x, topk_ids, topk_weights, experts: LocalExperts) -> torch.Tensor:
        all_x, all_ids, all_w = (self.gather(t) for t in (x, topk_ids, topk_weights))  # [W * n, ...]
        partial = experts(all_x, all_ids, all_w).contiguous()  # [W * n, H]: the copies routed here
        out = partial.new_empty(partial.shape[0] // self.info.world_size, partial.shape[1])
        dist.reduce_scatter_tensor(out, partial, group=self.info.group)
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_empty((t.shape[0] * self.info.world_size,) + tuple(t.shape[1:]))
        dist.all_gather_into_tensor(out, t.contiguous(), group=self.info.group)
        return out


DISPATCHERS = {cls.name: cls for cls in (LocalDispatcher, AllToAllDispatcher, AllGatherDispatcher)}


def make_dispatcher(name: str, info: ParallelInfo, stats: MoELayerStats) -> Dispatcher:
    """The dispatcher registered as `name`; a single rank always dispatches locally."""
    if name not in DISPATCHERS:
        raise ValueError(f"unknown MoE dispatcher {name!r}; choose one of {sorted(DISPATCHERS)}")
    return LocalDispatcher(info, stats) if info.is_single else DISPATCHERS[name](info, stats)
