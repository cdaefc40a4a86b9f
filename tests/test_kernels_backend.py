"""Fp8Backend selection, and the torch and Triton backends agreeing on random and tiny-checkpoint weights."""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

from k2serve.kernels import Fp8Backend, TorchReferenceBackend, TritonBackend, select_backend  # noqa: E402
from k2serve.kernels.block_fp8 import dequantize_block_fp8  # noqa: E402
from k2serve.kernels.reference import UNIT_ROUNDOFF, fp8_linear_error_bound  # noqa: E402
from k2serve.kernels.moe_weights import MoeWeights, stack_experts  # noqa: E402
from k2serve.kernels.testing import random_block_fp8, random_moe_weights, random_routing  # noqa: E402

CPU = torch.device("cpu")
# Triton quantizes activations (two e4m3 stages in the experts, each <= 2^-4 per element and averaging
# out in dot products); the torch backend does not: relative error in norm <= 2 * 2^-4.
MOE_REL_TOL = 2 * 2.0**-4


def _rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def test_selection_by_device_and_by_name():
    assert isinstance(select_backend(CPU), TorchReferenceBackend)
    assert isinstance(select_backend(CPU, force="torch"), TorchReferenceBackend)
    assert isinstance(select_backend(CPU, force="triton"), TritonBackend)  # runs under the interpreter
    assert all(isinstance(b, Fp8Backend) for b in (select_backend(CPU), select_backend(CPU, "triton")))
    with pytest.raises(ValueError, match="unknown FP8 backend 'cutlass'"):
        select_backend(CPU, force="cutlass")


def test_torch_backend_linear_is_the_dequantized_matmul():
    gen = torch.Generator().manual_seed(0)
    w_fp8, w_scale = random_block_fp8(200, 333, gen)
    x = torch.randn(2, 3, 333, generator=gen)
    y = select_backend(CPU).linear(x, w_fp8, w_scale)
    assert y.shape == (2, 3, 200)
    torch.testing.assert_close(y, x @ dequantize_block_fp8(w_fp8, w_scale).T)


def _linear_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Triton's deviation from exact (fp8_linear_error_bound) plus the torch backend's own
    # fp32 accumulation and rounding.
    exact_scale = x.abs() @ w.abs().T
    return fp8_linear_error_bound(x, w, x.dtype) + 2 * (x.shape[1] + 2) * UNIT_ROUNDOFF[x.dtype] * exact_scale


def _stack_experts(ckpt, prefix: str, num_experts: int) -> MoeWeights:
    return stack_experts(*([ckpt.read_fp8(f"{prefix}.{e}.{p}.weight") for e in range(num_experts)]
                           for p in ("gate_proj", "up_proj", "down_proj")))


def test_backends_agree_on_the_tiny_checkpoint(tiny_model_dir):
    from k2serve.worker.loader import Checkpoint
    from k2serve.worker.model.config import ModelConfig

    config, ckpt = ModelConfig.from_dir(tiny_model_dir), Checkpoint(tiny_model_dir)
    ref, tri = select_backend(CPU), select_backend(CPU, force="triton")
    layer = f"model.layers.{config.first_k_dense_replace}"  # the first MoE layer
    gen = torch.Generator().manual_seed(1)
    names = [n[: -len(".weight")] for n in ckpt.weight_map if n.startswith(layer + ".") and n.endswith(".weight")
             and ckpt.is_fp8(n) and ".experts." not in n]
    assert any("kv_a_proj_with_mqa" in n for n in names)  # partial row blocks, as in K2 (576 rows)
    for name in names:
        w_fp8, w_scale = ckpt.read_fp8(name + ".weight")
        x = torch.randn(3, w_fp8.shape[1], generator=gen)
        diff = (tri.linear(x, w_fp8, w_scale) - ref.linear(x, w_fp8, w_scale)).abs()
        assert (diff <= _linear_bound(x, dequantize_block_fp8(w_fp8, w_scale))).all(), name

    experts = _stack_experts(ckpt, f"{layer}.mlp.experts", config.n_routed_experts)
    x = torch.randn(6, config.hidden_size, generator=gen)
    ids, weights = random_routing(6, config.num_experts_per_tok, config.n_routed_experts, seed=2)
    want = ref.moe_experts(x, ids, weights, *experts.as_args())
    assert _rel_err(tri.moe_experts(x, ids, weights, *experts.as_args()), want) <= MOE_REL_TOL
    # Expert parallelism: two ranks each run their half of the experts on all tokens; the sum is the whole.
    half = config.n_routed_experts // 2
    ep = sum(tri.moe_experts(x, ids, weights, *experts.shard(r * half, half).as_args(), expert_offset=r * half)
             for r in range(2))
    assert _rel_err(ep, want) <= MOE_REL_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backends_agree_on_random_experts(dtype):
    w = random_moe_weights(5, 160, 96, seed=3)
    x = torch.randn(7, 160, generator=torch.Generator().manual_seed(4)).to(dtype)
    ids, weights = random_routing(7, 2, 5, seed=4)
    want = select_backend(CPU).moe_experts(x, ids, weights, *w.as_args())
    got = select_backend(CPU, force="triton").moe_experts(x, ids, weights, *w.as_args())
    assert got.dtype == want.dtype == dtype
    assert _rel_err(got, want) <= MOE_REL_TOL
