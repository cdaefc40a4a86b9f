"""The whole tiny K2 model with FP8 weights through a kernel backend: torch reference vs Triton (interpreter).

The model layers hold dense weights and take no backend yet, so this test swaps each block-FP8
linear and the routed experts for test-local modules that call an `Fp8Backend` on the checkpoint's
raw e4m3 weights and scales (single rank: no collectives). It pins down what the backend hook must
do and checks the Triton kernels end to end against the torch reference within FP8 tolerance.
"""

import os

import pytest
import torch
from torch import nn

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

from kernels import Fp8Backend, select_backend  # noqa: E402
from kernels.moe_weights import stack_experts  # noqa: E402

PROMPT = [5, 77, 300, 12, 900, 1000, 4, 8]
# Each FP8 matmul must stay within its rigorous activation-rounding bound on the model's own activations
# (checked by hooks); the experts within 2 * 2^-4 in norm (two quantization stages, see
# test_kernels_fused_moe). End to end, each quantized matmul adds ~2.5% relative noise (2^-4/sqrt(3) RMS)
# to the residual stream, and in a random-weight model such perturbations also flip some top-k expert
# choices and attention weights: the logits drift by ~14% in norm over the 3 layers. Bound 4 * 2^-4.
EXPERTS_REL_TOL = 2 * 2.0**-4
LOGITS_REL_TOL = 4 * 2.0**-4


class BackendLinear(nn.Module):
    """A single-rank linear whose forward is `backend.linear` on the checkpoint's e4m3 weight;
    `weight` stays dense for MLA's absorbed decode, which reads kv_b_proj.weight directly."""

    def __init__(self, dense: nn.Module, w_fp8, w_scale, backend: Fp8Backend):
        super().__init__()
        self.weight, self.w_fp8, self.w_scale, self.backend = dense.weight, w_fp8, w_scale, backend

    def forward(self, x):
        return self.backend.linear(x, self.w_fp8, self.w_scale)


class BackendExperts(nn.Module):
    """LocalExperts' interface (copies with local ids) served by `backend.moe_experts`."""

    def __init__(self, experts: nn.Module, stacked: tuple, backend: Fp8Backend):
        super().__init__()
        self.first_expert, self.n_local_experts = experts.first_expert, experts.n_local_experts
        self.stacked, self.backend = stacked, backend

    def forward(self, x, local_ids):
        ids = local_ids[:, None]  # [N, 1]: each copy is one (token, expert) pair, weighted later
        ones = torch.ones(ids.shape, dtype=torch.float32)
        return self.backend.moe_experts(x, ids, ones, *self.stacked)


def _stack_experts(ckpt, prefix: str, first: int, count: int) -> tuple:
    names = [f"{prefix}.{first + j}" for j in range(count)]
    return stack_experts(*([ckpt.read_fp8(f"{n}.{p}.weight") for n in names]
                           for p in ("gate_proj", "up_proj", "down_proj"))).as_args()


def _with_backend(model_dir, backend: Fp8Backend):
    from worker.loader import Checkpoint, load_model
    from worker.model.layers.experts import LocalExperts

    model, ckpt = load_model(model_dir, progress=False), Checkpoint(model_dir)
    for name, module in list(model.named_modules()):
        if ".experts." in name:  # inside LocalExperts, replaced as a whole
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, LocalExperts):
            stacked = _stack_experts(ckpt, name, module.first_expert, module.n_local_experts)
            setattr(parent, attr, BackendExperts(module, stacked, backend))
        elif ckpt.is_fp8(name + ".weight"):
            setattr(parent, attr, BackendLinear(module, *ckpt.read_fp8(name + ".weight"), backend))
    return model


def _prefill_logits(model, ids):
    from worker.model.attention_metadata import AttentionMetadata
    from worker.model.deepseek_v3 import allocate_kv_caches

    caches = allocate_kv_caches(model.config, 4, 16)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.contiguous([len(ids)], [0], 16), caches)
    return model.compute_logits(hidden)


def _rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _check_each_matmul_against_reference(model, failures: list[str]) -> None:
    """Hooks that recompute every FP8 matmul with the torch reference on the same input."""
    from kernels.block_fp8 import dequantize_block_fp8
    from kernels.reference import UNIT_ROUNDOFF, fp8_linear_error_bound
    ref = select_backend(torch.device("cpu"))

    def linear_hook(mod, inp, out, name):
        (x,) = inp
        x2, w = x.reshape(-1, x.shape[-1]), dequantize_block_fp8(mod.w_fp8, mod.w_scale)
        bound = fp8_linear_error_bound(x2, w, x.dtype) + 2 * (x2.shape[1] + 2) * UNIT_ROUNDOFF[x.dtype] * (x2.abs() @ w.abs().T)
        if not ((out.reshape(x2.shape[0], -1) - ref.linear(x2, mod.w_fp8, mod.w_scale)).abs() <= bound).all():
            failures.append(name)

    def experts_hook(mod, inp, out, name):
        x, local_ids = inp
        want = ref.moe_experts(x, local_ids[:, None], torch.ones(local_ids.shape[0], 1), *mod.stacked)
        if _rel_err(out, want) > EXPERTS_REL_TOL:
            failures.append(f"{name}: {_rel_err(out, want):.3f}")

    for name, mod in model.named_modules():
        if isinstance(mod, BackendLinear):
            mod.register_forward_hook(lambda m, i, o, name=name: linear_hook(m, i, o, name))
        elif isinstance(mod, BackendExperts):
            mod.register_forward_hook(lambda m, i, o, name=name: experts_hook(m, i, o, name))


@torch.no_grad()
def test_triton_backend_matches_torch_backend_on_the_tiny_model(tiny_model_dir):
    from worker.loader import load_model

    cpu = torch.device("cpu")
    dense = _prefill_logits(load_model(tiny_model_dir, progress=False), PROMPT)
    ref = _prefill_logits(_with_backend(tiny_model_dir, select_backend(cpu)), PROMPT)
    # The torch backend is the dequantized matmul: the same numbers as the dense model up to fp32 rounding.
    torch.testing.assert_close(ref, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())
    triton_model, failures = _with_backend(tiny_model_dir, select_backend(cpu, force="triton")), []
    _check_each_matmul_against_reference(triton_model, failures)
    got = _prefill_logits(triton_model, PROMPT)
    assert not failures, f"FP8 matmuls outside their bound: {failures}"
    assert not got.isnan().any()
    assert _rel_err(got, ref) <= LOGITS_REL_TOL
