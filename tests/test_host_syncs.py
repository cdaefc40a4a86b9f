"""Host synchronisations in the model's layers: at most one per MoE layer (the all-to-all's split sizes,
which also give dense experts their counts), none anywhere else in worker/model/ or in the attention
kernels the layers call.

A CPU cannot observe a CUDA synchronisation, so the test intercepts the tensor operations that force one
on CUDA (reading values back: tolist, item, bool/int/float, cpu; data-dependent shapes: nonzero,
boolean-mask indexing, masked_select; torch.bincount, which reads its maximum back; torch.tensor from
host data, a synchronous copy to the device) and attributes each to the nearest calling frame outside
torch. The counted code is worker/model/ and kernels/, except kernels/reference.py: the FP8 torch
reference stands in on CPU for the Triton kernels a GPU runs. The step mixes every attention path: a
long prefill chunk (key chunks and query tiles), a short one (a padded group), and decodes over short
and long contexts (the latter split into parts), under both attention backends (Triton under the
interpreter). Their plans are built once per step, with the batch, outside the counted forward.
benchmarks/gpu_smoke.py counts the real ones on a GPU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

# The Triton attention backend runs under the interpreter on CPU; this must precede triton's first import.
os.environ["TRITON_INTERPRET"] = "1"

from k2serve.kernels.backend import select_attention_backend  # noqa: E402
from k2serve.worker.config import EngineConfig  # noqa: E402
from k2serve.worker.device import fp8_backend  # noqa: E402
from k2serve.worker.distributed import free_port, init_distributed  # noqa: E402
from k2serve.worker.loader import load_model  # noqa: E402
from k2serve.worker.model_runner import ModelRunner, build_forward_batch  # noqa: E402
from k2serve.worker.parallel import ParallelInfo  # noqa: E402
from k2serve.worker.scheduler import StepPlan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COUNTED = (ROOT / "worker" / "model", ROOT / "kernels")
CPU_STAND_INS = {ROOT / "kernels" / "reference.py"}
TORCH_DIR = Path(torch.__file__).resolve().parent
READ_BACK = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
             "masked_select", "bincount", "unique", "tensor", "as_tensor"}


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
                        if _counted(Path(site[0]))})


def _counted(path: Path) -> bool:
    return any(path.is_relative_to(d) for d in COUNTED) and path not in CPU_STAND_INS


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _caller() -> tuple[str, int]:
    frame = sys._getframe(2)
    while frame is not None and Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH_DIR):
        frame = frame.f_back
    return (str(Path(frame.f_code.co_filename).resolve()), frame.f_lineno) if frame else ("?", 0)


BLOCK_SIZE = 16
LONG, SHORT, DECODE_CONTEXTS = 800, 7, (3, 300)


def blocks(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BLOCK_SIZE)))


def context_plan() -> StepPlan:
    """Caches the decodes' contexts: 3 tokens in block 19, 300 in blocks 0-18."""
    return StepPlan(["c", "d"], [list(range(1, 4)), [7] * 300], [0, 0], [[19], blocks(0, 301)], [False, False],
                    BLOCK_SIZE)


def mixed_plan() -> StepPlan:
    """An 800-token prefill (past the grouped path's 2^19 pairs), a 7-token one, and decodes over 3 and 300
    cached tokens (the torch backend cuts the long one into parts and merges them): 809 tokens."""
    return StepPlan(["long", "short", "c", "d"], [[5] * LONG, [5, 77, 300, 12, 900, 1000, 4], [9], [11]],
                    [0, 0, *DECODE_CONTEXTS], [blocks(20, LONG), [70], [19], blocks(0, 301)],
                    [True, True, True, True], BLOCK_SIZE)


def count_forward(model, info: ParallelInfo = ParallelInfo(), attention: str = "torch") -> Counter:
    """Syncs in the counted code during one model forward over `mixed_plan` (contexts cached first)."""
    runner = ModelRunner(model, 72, BLOCK_SIZE, info=info)
    runner.execute(context_plan())
    batch = build_forward_batch(mixed_plan(), "cpu", select_attention_backend(torch.device("cpu"), attention))
    with torch.inference_mode(), SyncCounter() as counter:
        model(batch.input_ids, batch.positions, batch.attn, runner.kv_caches)
    return counter.in_layers()


def num_moe_layers(model) -> int:
    return sum(model.config.is_moe_layer(i) for i in range(model.config.num_hidden_layers))


def files(sites: Counter) -> set[str]:
    return {Path(f).name for f, _ in sites}


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_dense_single_rank_reads_back_once_per_moe_layer(tiny_model_dir, attention):
    model = load_model(tiny_model_dir, torch.float32, progress=False)
    sites = count_forward(model, attention=attention)
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


