"""The whole tiny K2 model with FP8 weights through a kernel backend: torch reference vs Triton (interpreter).

`load_model(..., fp8_backend=...)` keeps every block-FP8 matrix as the checkpoint stores it (routed
experts stacked into the fused layout) and multiplies with the chosen backend, the path serving takes
on GPU. The torch backend must reproduce the dense model; the Triton kernels must stay within FP8
tolerance of it, matmul by matmul and end to end.
"""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

from k2serve.kernels import select_backend  # noqa: E402

PROMPT = [5, 77, 300, 12, 900, 1000, 4, 8]
# Each FP8 matmul must stay within its rigorous activation-rounding bound on the model's own activations
# (checked by hooks); the experts within 2 * 2^-4 in norm (two quantization stages, see
# test_kernels_fused_moe). End to end, each quantized matmul adds ~2.5% relative noise (2^-4/sqrt(3) RMS)
# to the residual stream, and in a random-weight model such perturbations also flip some top-k expert
# choices and attention weights: the logits drift by ~14% in norm over the 3 layers. Bound 4 * 2^-4.
EXPERTS_REL_TOL = 2 * 2.0**-4
LOGITS_REL_TOL = 4 * 2.0**-4


def _with_backend(model_dir, backend: str):
    """The model as serving builds it on GPU: block-FP8 matrices multiplied by the named backend."""
    from k2serve.worker.loader import load_model

    return load_model(model_dir, progress=False, fp8_backend=backend)


def _prefill_logits(model, ids):
    from k2serve.worker.model.attention_metadata import AttentionMetadata
    from k2serve.worker.model.deepseek_v3 import allocate_kv_caches

    caches = allocate_kv_caches(model.config, 4, 16)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.contiguous([len(ids)], [0], 16), caches)
    return model.compute_logits(hidden)


def _rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _check_each_matmul_against_reference(model, failures: list[str]) -> None:
    """Hooks that recompute every FP8 matmul with the torch reference on the same input."""
    from k2serve.kernels.block_fp8 import dequantize_block_fp8
    from k2serve.kernels.reference import UNIT_ROUNDOFF, fp8_linear_error_bound
    ref = select_backend(torch.device("cpu"))

    def linear_hook(mod, inp, out, name):
        (x,) = inp
        x2, w = x.reshape(-1, x.shape[-1]), dequantize_block_fp8(mod.weight, mod.weight_scale_inv)
        bound = fp8_linear_error_bound(x2, w, x.dtype) + 2 * (x2.shape[1] + 2) * UNIT_ROUNDOFF[x.dtype] * (x2.abs() @ w.abs().T)
        if not ((out.reshape(x2.shape[0], -1) - ref.linear(x2, mod.weight, mod.weight_scale_inv)).abs() <= bound).all():
            failures.append(name)

    def experts_hook(mod, inp, out, name):
        x, topk_ids, topk_weights = inp[:3]
        fused = (mod.w13_fp8, mod.w13_scale, mod.w2_fp8, mod.w2_scale)
        want = ref.moe_experts(x, topk_ids, topk_weights, *fused, expert_offset=mod.first_expert)
        if _rel_err(out, want) > EXPERTS_REL_TOL:
            failures.append(f"{name}: {_rel_err(out, want):.3f}")

    from k2serve.worker.model.layers.experts import LocalExperts
    from k2serve.worker.model.layers.linear import _Linear

    for name, mod in model.named_modules():
        if isinstance(mod, _Linear) and mod.fp8 is not None:
            mod.register_forward_hook(lambda m, i, o, name=name: linear_hook(m, i, o, name))
        elif isinstance(mod, LocalExperts):
            assert mod.is_fused
            mod.register_forward_hook(lambda m, i, o, name=name: experts_hook(m, i, o, name))


@torch.no_grad()
def test_triton_backend_matches_torch_backend_on_the_tiny_model(tiny_model_dir):
    from k2serve.worker.loader import load_model

    dense = _prefill_logits(load_model(tiny_model_dir, progress=False), PROMPT)
    ref = _prefill_logits(_with_backend(tiny_model_dir, "torch"), PROMPT)
    # The torch backend is the dequantized matmul: the same numbers as the dense model up to fp32 rounding.
    torch.testing.assert_close(ref, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())
    triton_model, failures = _with_backend(tiny_model_dir, "triton"), []
    _check_each_matmul_against_reference(triton_model, failures)
    got = _prefill_logits(triton_model, PROMPT)
    assert not failures, f"FP8 matmuls outside their bound: {failures}"
    assert not got.isnan().any()
    assert _rel_err(got, ref) <= LOGITS_REL_TOL
