"""The kernel backends, chosen once per device: FP8 matrices (`select_backend`) and MLA attention
(`select_attention_backend`, implementations in `kernels.attention_backend`).

Layers call `backend.linear(...)` and `backend.moe_experts(...)` and never branch on the platform.
`TorchReferenceBackend` (CPU) dequantizes weights to the activation dtype and multiplies: simple and
exact up to bf16 rounding. `TritonBackend` (CUDA) quantizes activations to FP8 and runs the block-scaled
Triton kernels. Triton is imported only when a `TritonBackend` is built, so CPU installs need no Triton.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from k2serve.kernels.attention_backend import MLABackend, TorchMLABackend, TritonMLABackend
from k2serve.kernels.block_fp8 import DEFAULT_BLOCK
from k2serve.kernels.reference import dequant_linear_ref, fused_moe_ref


class Fp8Backend(ABC):
    """Block-FP8 linear layers and routed experts (expert weight layout: `kernels.moe_weights`)."""

    name: str

    @abstractmethod
    def linear(
        self, x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale_inv: torch.Tensor,
        block: tuple[int, int] = DEFAULT_BLOCK,
    ) -> torch.Tensor:
        """y = x @ W^T for e4m3 W [N, K] with scales [ceil(N/bn), ceil(K/bk)]: [.., K] -> [.., N], x's dtype."""

    @abstractmethod
    def moe_experts(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        w13_fp8: torch.Tensor, w13_scale: torch.Tensor, w2_fp8: torch.Tensor, w2_scale: torch.Tensor,
        block: tuple[int, int] = DEFAULT_BLOCK, expert_offset: int = 0,
    ) -> torch.Tensor:
        """Weighted sum of each token's routed experts: x [T, H], topk_ids [T, k] (global ids; those whose
        `id - expert_offset` is outside [0, E_local) are skipped), topk_weights [T, k] float32 -> [T, H]."""


class TorchReferenceBackend(Fp8Backend):
    """Dequantize + matmul in the activation dtype; the CPU backend and the correctness yardstick."""

    name = "torch"

    def linear(self, x, weight_fp8, weight_scale_inv, block=DEFAULT_BLOCK):
        return dequant_linear_ref(x, weight_fp8, weight_scale_inv, block)

    def moe_experts(self, x, topk_ids, topk_weights, w13_fp8, w13_scale, w2_fp8, w2_scale,
                    block=DEFAULT_BLOCK, expert_offset=0):
        return fused_moe_ref(x, topk_ids, topk_weights, w13_fp8, w13_scale, w2_fp8, w2_scale,
                             block, expert_offset, quantize_activations=False)


class TritonBackend(Fp8Backend):
    """FP8 activations (per token group of 128) and block-scaled Triton GEMMs with fp32 accumulation."""

    name = "triton"

    def __init__(self, device: torch.device) -> None:
        from k2serve.kernels.triton_cast import is_interpreter

        if device.type != "cuda" and not is_interpreter():
            raise RuntimeError(
                f"the Triton backend needs a CUDA device, got {device}; on CPU set TRITON_INTERPRET=1 "
                "before triton is first imported (tests do) or use the torch backend"
            )
        from k2serve.kernels.fp8_gemm import fp8_linear
        from k2serve.kernels.fused_moe import fused_moe

        self._fp8_linear = fp8_linear
        self._fused_moe = fused_moe

    def linear(self, x, weight_fp8, weight_scale_inv, block=DEFAULT_BLOCK):
        return self._fp8_linear(x, weight_fp8, weight_scale_inv, block)

    def moe_experts(self, x, topk_ids, topk_weights, w13_fp8, w13_scale, w2_fp8, w2_scale,
                    block=DEFAULT_BLOCK, expert_offset=0):
        return self._fused_moe(x, topk_ids, topk_weights, w13_fp8, w13_scale, w2_fp8, w2_scale,
                               block, expert_offset)


BACKENDS = {"torch": TorchReferenceBackend, "triton": TritonBackend}


def select_backend(device: torch.device, force: str | None = None) -> Fp8Backend:
    """The backend for `device`: Triton on CUDA, the torch reference elsewhere; `force` names one."""
    name = force or ("triton" if device.type == "cuda" else "torch")
    if name not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {name!r}; choose one of {sorted(BACKENDS)}")
    if name == "triton":
        return TritonBackend(device)
    return TorchReferenceBackend()


ATTENTION_BACKENDS = {"torch": TorchMLABackend, "triton": TritonMLABackend}


def select_attention_backend(device: torch.device, force: str | None = None) -> MLABackend:
    """MLA attention for `device`: the Triton kernels on CUDA, batched torch elsewhere; `force` names one."""
    name = force or ("triton" if device.type == "cuda" else "torch")
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    if name == "triton":
        return TritonMLABackend(device)
    return TorchMLABackend()
