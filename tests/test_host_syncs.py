"""Host synchronisations in the model's layers: at most one per MoE layer (the all-to-all's split sizes,
which also give dense experts their counts), none anywhere else in worker/model/.

A CPU cannot observe a CUDA synchronisation, so the test intercepts the tensor operations that force one
on CUDA (reading values back: tolist, item, bool/int/float, cpu; data-dependent shapes: nonzero,
boolean-mask indexing, masked_select; torch.bincount, which reads its maximum back; torch.tensor from
host data, a synchronous copy to the device) and attributes each to the nearest calling frame outside
torch. benchmarks/gpu_smoke.py counts the real ones on a GPU.

attention.py is left out: it builds a tensor of decode rows from host data in every layer, and its
rewrite (a paged decode kernel over per-step metadata) is under way beside this test.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from k2serve.worker.config import EngineConfig
from k2serve.worker.device import fp8_backend
from k2serve.worker.distributed import free_port, init_distributed
from k2serve.worker.loader import load_model
from k2serve.worker.model_runner import ModelRunner, build_forward_batch
from k2serve.worker.parallel import ParallelInfo
from k2serve.worker.scheduler import StepPlan

MODEL_DIR = Path(__file__).resolve().parent.parent / "worker" / "model"
TORCH_DIR = Path(torch.__file__).resolve().parent
READ_BACK = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
             "masked_select", "bincount", "unique", "tensor", "as_tensor"}
NOT_YET = {"attention.py"}


class SyncCounter(TorchFunctionMode):
    """Counts, per (file, line) of the caller, the operations that synchronise the host with a GPU."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READ_BACK or (name in ("__getitem__", "__setitem__") and _bool_index(args)):
            self.sites[_caller()] += 1
        return func(*args, **kwargs)

    def in_layers(self) -> Counter:
        return Counter({site: n for site, n in self.sites.items()
                        if Path(site[0]).is_relative_to(MODEL_DIR) and Path(site[0]).name not in NOT_YET})


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _caller() -> tuple[str, int]:
    frame = sys._getframe(2)
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH_DIR):
        frame = frame.f_back
    return (str(Path(frame.f_code.co_filename).resolve()), frame.f_lineno) if frame else ("?", 0)


def two_sequence_plan() -> StepPlan:
    """A 7-token prefill and a decode: 8 tokens."""
    return StepPlan(["a", "b"], [[5, 77, 300, 12, 900, 1000, 4], [9]], [0, 3], [[0], [1]], [True, True], 16)


def count_forward(model, info: ParallelInfo = ParallelInfo()) -> Counter:
    """Syncs inside worker/model/ during one model forward over `two_sequence_plan` (context cached first)."""
    runner = ModelRunner(model, 4, 16, info=info)
    runner.execute(StepPlan(["b"], [[1, 2, 3]], [0], [[1]], [False], 16))  # the decode's context
    batch = build_forward_batch(two_sequence_plan())
    with torch.inference_mode(), SyncCounter() as counter:
        model(batch.input_ids, batch.positions, batch.attn, runner.kv_caches)
    return counter.in_layers()


def num_moe_layers(model) -> int:
    return sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))


def files(sites: Counter) -> set[str]:
    return {Path(f).name for f, _ in sites}


def test_dense_single_rank_reads_back_once_per_moe_layer(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float32, progress=False)
    sites = count_forward(model)
    assert sum(sites.values()) == num_moe_layers(model) and files(sites) == {"experts.py"}, sites


def test_fp8_experts_read_nothing_back(tiny_model_dir):
    """FP8 weights run through the backend's fused MoE (the Triton kernel on CUDA): no sync in the layers."""
    model = load_model(tiny_model_dir, torch.float32, progress=False,
                       fp8_backend=fp8_backend(EngineConfig(weight_format="fp8")))
    assert count_forward(model) == Counter()


def rank_syncs(rank: int, port: int, model_dir: str, results) -> None:
    try:
        torch.set_num_threads(1)
        info = init_distributed(rank, 2, "127.0.0.1", port, "gloo", 60.0)
        results.put((rank, count_forward(load_model(model_dir, torch.float32, info, progress=False), info)))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def test_all_to_all_reads_back_once_per_moe_layer(tiny_model_dir):
    ctx = mp.get_context("fork")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_syncs, args=(r, port, str(tiny_model_dir), results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    expected = num_moe_layers(load_model(tiny_model_dir, torch.float32, progress=False))
    for rank, sites in got.items():
        assert isinstance(sites, Counter), f"rank {rank} failed:\n{sites}"
        assert sum(sites.values()) == expected and files(sites) == {"dispatcher.py"}, (rank, sites)


