"""How rank 0's step plans reach the other ranks of a group: one broadcast per step, no Ray calls.

Rank 0's runner is a BroadcastingRunner: `execute(plan)` first broadcasts the plan over the gloo control
group, then runs its own shard. Every other rank runs `follow(runner, channel)`, which executes each
plan it receives until rank 0 sends None (shutdown).

`heartbeat()` is the no-op step an idle engine runs: a Heartbeat goes to every rank, and every rank
joins one all-reduce on the group's tensor process group (NCCL on GPU), so it returns only when every
rank took part, and fails after the collective timeout when one cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from k2serve.worker.model_runner import ForwardResult, ModelRunner
from k2serve.worker.parallel import ParallelInfo, all_reduce
from k2serve.worker.scheduler import StepPlan


@dataclass(frozen=True)
class Heartbeat:
    """The message of a heartbeat: each rank joins `barrier` instead of running a plan."""


def barrier(info: ParallelInfo, device: torch.device) -> None:
    """One all-reduce on the tensor process group; raises unless every rank of the group joined it."""
    count = all_reduce(torch.ones(1, device=device), info)  # [1]
    if int(count.item()) != info.world_size:
        raise RuntimeError(f"heartbeat reached {int(count.item())} of {info.world_size} ranks")


class PlanChannel:
    def __init__(self, info: ParallelInfo):
        self.info = info

    def send(self, plan) -> None:
        """Rank 0: broadcast a StepPlan (or None to stop the followers)."""
        if not self.info.is_single:
            dist.broadcast_object_list([plan], src=0, group=self.info.control_group)

    def recv(self):
        """Other ranks: block until rank 0 broadcasts the next plan."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.info.control_group)
        return box[0]


class BroadcastingRunner(ModelRunner):
    """Rank 0's ModelRunner: each plan goes to every rank, then runs here; its result comes back here.

    Built like a ModelRunner, with the group's PlanChannel first.
    """

    def __init__(self, channel: PlanChannel, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel = channel

    def execute(self, plan: StepPlan) -> ForwardResult:
        self.channel.send(plan)
        return super().execute(plan)

    def heartbeat(self) -> None:
        self.channel.send(Heartbeat())
        barrier(self.channel.info, self.device)

    def stop_followers(self) -> None:
        """Release the other ranks from `follow`."""
        self.channel.send(None)


def follow(runner: ModelRunner, channel: PlanChannel) -> int:
    """Execute rank 0's plans (and join its heartbeats) until it sends None; returns the number of steps run."""
    steps = 0
    while (plan := channel.recv()) is not None:
        if isinstance(plan, Heartbeat):
            barrier(channel.info, runner.device)
            continue
        runner.execute(plan)
        steps += 1
    return steps
