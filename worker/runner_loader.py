"""Loading a rank's model and building its ModelRunner, with every device-dependent choice made once.

`load_runner` is the one construction path, for one process (Engine.from_model_dir) and for each rank of
a group (RankWorker.load). From the EngineConfig and its device (worker/device.py) it takes the activation
dtype, how block-FP8 matrices are held (the FP8 kernel backend), the latent cache's storage dtype (FP8 or
the activation dtype) and the MLA attention backend; then worker/kv_sizing.py decides the block count,
profiling on CUDA with that same cache dtype and attention backend, so the sized step is the served one.
"""

from __future__ import annotations

from pathlib import Path

from k2serve.worker.config import EngineConfig
from k2serve.worker.device import activation_dtype, attention_backend, cache_dtype, fp8_backend, memory_probe
from k2serve.worker.kv_sizing import MemoryProbe, num_kv_blocks
from k2serve.worker.loader import load_model
from k2serve.worker.model_runner import ModelRunner
from k2serve.worker.parallel import ParallelInfo
from k2serve.worker.plan_channel import BroadcastingRunner, PlanChannel


def load_runner(model_dir: str | Path, config: EngineConfig, info: ParallelInfo = ParallelInfo(),
                dispatcher: str = "all_to_all", probe: MemoryProbe | None = None,
                channel: PlanChannel | None = None, progress: bool = False) -> ModelRunner:
    """This rank's shard of the checkpoint on `config.device` and a runner over a cache sized for it.

    Every rank of `info`'s group calls it at once (the sizing runs collectives). `probe` replaces the
    device's memory probe; with a `channel` (rank 0 of a group) the runner broadcasts each plan first.
    """
    kv_dtype, attention = cache_dtype(config), attention_backend(config)
    model = load_model(model_dir, activation_dtype(config), info, dispatcher, progress=progress,
                       fp8_backend=fp8_backend(config), device=config.device)
    blocks = num_kv_blocks(model, config, info, kv_dtype, probe or memory_probe(config), attention)
    args = (model, blocks, config.block_size, kv_dtype, config.device)
    if channel is None:
        return ModelRunner(*args, info=info, attention=attention)
    return BroadcastingRunner(channel, *args, info=info, attention=attention)
