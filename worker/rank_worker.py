"""RankWorker: one rank of a worker group, independent of how it was started (Ray or a test).

Every rank joins the group's torch.distributed world, loads only its shard of the model (its heads,
its vocab slice, its experts) and sizes its latent cache (worker/kv_sizing.py: a profiled step on CUDA),
all ranks agreeing on the smallest block count; a rank runs on its group's device. Rank 0's runner is
a BroadcastingRunner, so each step's plan reaches the others by one broadcast; rank 0 builds the Engine
over it, and the other ranks run `follow()` until rank 0 shuts them down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from k2serve.worker.config import EngineConfig
from k2serve.worker.device import memory_probe
from k2serve.worker.distributed import destroy_distributed, init_distributed
from k2serve.worker.kv_sizing import MemoryProbe
from k2serve.worker.model_runner import ModelRunner
from k2serve.worker.parallel import ParallelInfo
from k2serve.worker.plan_channel import PlanChannel, follow
from k2serve.worker.runner_loader import load_runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSpec:
    """What one rank of a group needs to know to start (cluster/group.py derives it from the group's config)."""

    rank: int
    world_size: int
    model_dir: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    device: str = "cpu"  # the group's device: "cuda" (NCCL between the ranks) or "cpu" (gloo)
    collective_timeout_s: float = 30.0
    dispatcher: str = "all_to_all"
    heartbeat_interval_s: float | None = None  # rank 0 serving: an idle engine's no-op step through every rank
    hang_timeout_s: float | None = None  # rank 0 serving: a step running longer fails the engine

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


class RankWorker:
    """Runs `spec.engine` on the group's device; `probe` replaces that device's memory probe (tests)."""

    def __init__(self, spec: RankSpec, probe: MemoryProbe | None = None):
        self.spec = spec
        self.engine = spec.engine.model_copy(update={"device": spec.device})
        self.info = ParallelInfo(spec.rank, spec.world_size)
        self.probe = probe or memory_probe(self.engine)
        self.runner: ModelRunner | None = None

    def join(self, master_addr: str, master_port: int) -> None:
        self.info = init_distributed(
            self.spec.rank, self.spec.world_size, master_addr, master_port,
            self.spec.backend, self.spec.collective_timeout_s,
        )

    def load(self) -> int:
        """Load this rank's shard and size its cache (every rank at once: the sizing runs collectives);
        returns the number of parameter elements it holds."""
        channel = PlanChannel(self.info) if self.info.is_driver else None
        self.runner = load_runner(self.spec.model_dir, self.engine, self.info, self.spec.dispatcher, self.probe,
                                  channel, progress=self.info.is_driver)
        return self.num_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.runner.model.parameters())

    def parameter_names(self) -> list[str]:
        return [n for n, _ in self.runner.model.named_parameters()]

    def build_engine(self):
        """Rank 0: the Engine over this rank's runner, which broadcasts every plan to the group."""
        from k2serve.worker.engine import Engine
        from k2serve.worker.vocab import Vocab

        if not self.info.is_driver:
            raise RuntimeError(f"only rank 0 runs the engine, this is rank {self.info.rank}")
        vocab = Vocab.from_model_dir(Path(self.spec.model_dir), self.runner.model.config.vocab_size)
        return Engine(self.engine, self.runner, vocab)

    def follow(self) -> int:
        """Ranks > 0: execute rank 0's plans until it stops the group."""
        return follow(self.runner, PlanChannel(self.info))

    def close(self) -> None:
        destroy_distributed()
