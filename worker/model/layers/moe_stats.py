"""MoE statistics: what each MoE layer routed and exchanged, and how a rank collects them.

Each `MoE` layer owns one `MoELayerStats` (a submodule, so its counts live on the layer's device). On the
hot path the layer adds its routing into a device tensor (no host synchronisation) and its dispatcher
adds the bytes it sends to other ranks (host integers it already has). When a step's plan asks for the
statistics (`StepPlan.collect_moe_stats`), the ModelRunner's `MoEStatsCollector` times that step's
exchanges, then drains every layer and sums the counts over the group: one all-reduce, the same
collective on every rank. The result, a plain `MoEStatsSnapshot`, travels back to rank 0's engine in
the runner's result.

Exchange durations are measured where the exchange really happens: on CUDA with events recorded on
the compute stream around the collective (so they include waiting for the other ranks), on gloo with
the wall clock (its collectives return when done). Only the collecting step is timed, so the
histogram holds one sample per layer and phase about once a second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from k2serve.worker.parallel import ParallelInfo, all_reduce

PHASES = ("dispatch", "combine")


class ExchangeTimer(Protocol):
    """Measures one collective; `start` before the launch, `stop` after it, `seconds` once it completed."""

    def start(self) -> object: ...

    def stop(self, started: object) -> object: ...

    def seconds(self, started: object, stopped: object) -> float: ...


class WallClockTimer:
    """For collectives that return when they are done (gloo)."""

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, started: float) -> float:
        return time.perf_counter()

    def seconds(self, started: float, stopped: float) -> float:
        return stopped - started


class CudaEventTimer:
    """For NCCL: events on the current stream bracket the collective; read after the stream synchronised."""

    def start(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started: torch.cuda.Event) -> torch.cuda.Event:
        return self.start()

    def seconds(self, started: torch.cuda.Event, stopped: torch.cuda.Event) -> float:
        stopped.synchronize()
        return started.elapsed_time(stopped) / 1e3


def exchange_timer(info: ParallelInfo) -> ExchangeTimer:
    """The timer that measures this group's collectives honestly (chosen once, by the backend)."""
    if not info.is_single and dist.get_backend(info.group) == "nccl":
        return CudaEventTimer()
    return WallClockTimer()


def expert_histogram(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[num_experts] int64 count of each id in `ids`, on ids' device, without a host synchronisation
    (torch.bincount reads the maximum back to the host on CUDA)."""
    flat = ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


class MoELayerStats(nn.Module):
    """One MoE layer's counters since the last collection (a module so they follow `.to(device)`)."""

    def __init__(self, layer_idx: int, n_routed_experts: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.register_buffer("expert_tokens", torch.zeros(n_routed_experts, dtype=torch.long), persistent=False)
        self.bytes_sent = dict.fromkeys(PHASES, 0)
        self.timer: ExchangeTimer | None = None  # set for a collecting step only
        self.timings: list[tuple[str, object, object]] = []  # (phase, started, stopped) of this step

    def record_routing(self, topk_ids: torch.Tensor) -> None:
        """Add the routing of this rank's tokens [n, k] (padding rows excluded by the caller)."""
        self.expert_tokens += expert_histogram(topk_ids, self.expert_tokens.shape[0])

    def record_exchange(self, phase: str, num_bytes: int, started: object | None, stopped: object | None) -> None:
        self.bytes_sent[phase] += num_bytes
        if self.timer is not None:
            self.timings.append((phase, started, stopped))

    def start_timer(self) -> object | None:
        return self.timer.start() if self.timer is not None else None

    def stop_timer(self, started: object | None) -> object | None:
        return self.timer.stop(started) if self.timer is not None else None

    def reset(self) -> None:
        self.expert_tokens.zero_()
        self.bytes_sent = dict.fromkeys(PHASES, 0)
        self.timer, self.timings = None, []


@dataclass
class MoEStatsSnapshot:
    """The group's MoE statistics since the last collection, as plain Python values."""

    expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens per expert (group sum)
    bytes_sent: dict[str, int] = field(default_factory=dict)  # phase -> bytes all ranks sent to other ranks
    durations: list[tuple[str, float]] = field(default_factory=list)  # (phase, seconds) of this rank's timed step


class MoEStatsCollector:
    """The ModelRunner's handle on every MoE layer's statistics (the one owner of collection)."""

    def __init__(self, model: nn.Module, info: ParallelInfo, timer: ExchangeTimer | None = None):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayerStats)]
        self.info, self.timer = info, timer or exchange_timer(info)
        self.reset()  # a new runner counts from zero

    def reset(self) -> None:
        """Forget what the layers counted (a new runner, or a profiling step that served no one)."""
        for layer in self.layers:
            layer.reset()

    def time_next_step(self) -> None:
        """Time the exchanges of the coming forward (a collecting step)."""
        for layer in self.layers:
            layer.timer = self.timer

    def collect(self, device: torch.device) -> MoEStatsSnapshot:
        """Drain every layer; counts and bytes summed over the group (one all-reduce on every rank)."""
        if not self.layers:
            return MoEStatsSnapshot()
        num_bytes = [[layer.bytes_sent[p] for p in PHASES] for layer in self.layers]
        sent = torch.tensor(num_bytes, dtype=torch.long, device=device).sum(dim=0)  # [phases]
        counts = torch.cat([torch.stack([layer.expert_tokens for layer in self.layers]).flatten(), sent])
        totals = all_reduce(counts, self.info).tolist()
        durations = [(phase, layer.timer.seconds(a, b)) for layer in self.layers for phase, a, b in layer.timings]
        n_experts = self.layers[0].expert_tokens.shape[0]
        snapshot = MoEStatsSnapshot(
            {layer.layer_idx: totals[i * n_experts:(i + 1) * n_experts] for i, layer in enumerate(self.layers)},
            dict(zip(PHASES, totals[len(self.layers) * n_experts:])), durations)
        self.reset()
        return snapshot
