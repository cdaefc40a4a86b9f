"""RankWorker: one rank of a worker group, independent of how it was started (Ray or a test).

Every rank joins the group's torch.distributed world, loads only its shard of the model (its heads,
its vocab slice, its experts) and allocates the same number of latent-cache blocks. Rank 0's runner is
a BroadcastingRunner, so each step's plan reaches the others by one broadcast; rank 0 builds the Engine
over it, and the other ranks run `follow()` until rank 0 shuts them down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k2serve.kernels.latent_cache import kv_cache_dtype
from k2serve.worker.config import EngineConfig
from k2serve.worker.distributed import destroy_distributed, init_distributed
from k2serve.worker.loader import load_model
from k2serve.worker.model_runner import ModelRunner, num_kv_blocks
from k2serve.worker.parallel import ParallelInfo
from k2serve.worker.plan_channel import BroadcastingRunner, PlanChannel, follow

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
    def __init__(self, spec: RankSpec):
        self.spec = spec
        self.info = ParallelInfo(spec.rank, spec.world_size)
        self.runner: ModelRunner | None = None

    def join(self, master_addr: str, master_port: int) -> None:
        self.info = init_distributed(
            self.spec.rank, self.spec.world_size, master_addr, master_port,
            self.spec.backend, self.spec.collective_timeout_s,
        )

    def load(self) -> int:
        """Load this rank's shard; returns the number of parameter elements it holds."""
        dtype = getattr(torch, self.spec.engine.dtype)
        device = self.spec.device
        # Chosen once, by device: FP8 matrices + Triton kernels on GPU, dense weights on CPU.
        fp8_backend = "auto" if device.startswith("cuda") else None
        model = load_model(self.spec.model_dir, dtype, self.info, self.spec.dispatcher,
                           progress=self.info.is_driver, fp8_backend=fp8_backend, device=device)
        kv_dtype = kv_cache_dtype(self.spec.engine.kv_cache_dtype, dtype)
        blocks = num_kv_blocks(self.spec.engine, model.config, kv_dtype)
        args = (model, blocks, self.spec.engine.block_size, kv_dtype, device)
        self.runner = BroadcastingRunner(PlanChannel(self.info), *args) if self.info.is_driver else ModelRunner(*args)
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
        return Engine(self.spec.engine, self.runner, vocab)

    def follow(self) -> int:
        """Ranks > 0: execute rank 0's plans until it stops the group."""
        return follow(self.runner, PlanChannel(self.info))

    def close(self) -> None:
        destroy_distributed()
