"""MLA attention backends over the paged latent cache; `kernels.backend.select_attention_backend` picks one
per device, once, and the model's attention layers call it without branching on the platform.

Per step the model runner asks the backend to plan the step's decodes (`plan_decode`, on the host, from
the plan's plain lists: no device synchronisation); every layer then runs `decode` on that plan and
`prefill` on the step's prefill chunks (planned by `kernels.mla_prefill_batch.plan_prefill`).
`TorchMLABackend` (CPU) uses batched torch ops (`kernels.mla_decode_torch`); `TritonMLABackend` (CUDA)
runs the split-KV Triton kernel (`kernels.mla_decode`). Both prefill in torch (`kernels.mla_prefill_batch`:
short chunks in padded groups, long ones memory-bounded), whose matmuls run on the tensors' device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from k2serve.kernels.mla_decode_torch import TorchDecodePlan, mla_decode_torch, plan_torch_decode
from k2serve.kernels.mla_prefill_batch import PrefillPlan, prefill


class MLABackend(ABC):
    """Absorbed decode and expanded prefill over caches [num_blocks, block_size, kv_lora_rank + rope_dim]."""

    name: str

    @abstractmethod
    def plan_decode(self, seq_lens: list[int], block_tables: list[list[int]], block_size: int,
                    device: torch.device) -> object:
        """This backend's description of a step's decoding sequences (context lengths including the new
        token, and their block tables); built once per step and shared by every layer."""

    @abstractmethod
    def decode(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, plan: object,
               sm_scale: float, kv_scale: float) -> torch.Tensor:
        """q_latent [B, H, Dl] (q_nope @ W_UK), q_pe [B, H, Dr] -> softmax-weighted latents [B, H, Dl]."""

    def prefill(self, q: torch.Tensor, cache: torch.Tensor, plan: PrefillPlan, w_kv: torch.Tensor,
                sm_scale: float, kv_scale: float, out: torch.Tensor) -> None:
        """The plan's prefill chunks (rows of q [T, H, Dn + Dr]) attend causally over their contexts; results
        go to the same rows of out [T, H, Dv]. w_kv [H, Dn + Dv, Dl] is kv_b_proj per head (dense)."""
        prefill(q, cache, plan, w_kv, sm_scale, kv_scale, out)


class TorchMLABackend(MLABackend):
    """Batched torch ops; the CPU backend."""

    name = "torch"

    def plan_decode(self, seq_lens, block_tables, block_size, device) -> TorchDecodePlan:
        return plan_torch_decode(seq_lens, block_tables, block_size, device)

    def decode(self, q_latent, q_pe, cache, plan: TorchDecodePlan, sm_scale, kv_scale):
        return mla_decode_torch(q_latent, q_pe, cache, plan, sm_scale, kv_scale)


@dataclass(frozen=True)
class TritonDecodePlan:
    block_tables: torch.Tensor  # [B, max_blocks] int32, right-padded with block 0 (never read)
    seq_lens: torch.Tensor  # [B] int32
    max_seq_len: int


class TritonMLABackend(MLABackend):
    """The split-KV Triton decode kernel; the CUDA backend (also runs under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, device: torch.device) -> None:
        from k2serve.kernels.triton_cast import is_interpreter

        if device.type != "cuda" and not is_interpreter():
            raise RuntimeError(
                f"the Triton attention backend needs a CUDA device, got {device}; on CPU set TRITON_INTERPRET=1 "
                "before triton is first imported (tests do) or use the torch backend"
            )
        from k2serve.kernels.mla_decode import mla_decode

        self._mla_decode = mla_decode

    def plan_decode(self, seq_lens, block_tables, block_size, device) -> TritonDecodePlan:
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]
        int32 = dict(dtype=torch.int32, device=device)
        return TritonDecodePlan(torch.tensor(tables, **int32).view(len(tables), width),
                                torch.tensor(seq_lens, **int32), max(seq_lens))

    def decode(self, q_latent, q_pe, cache, plan: TritonDecodePlan, sm_scale, kv_scale):
        return self._mla_decode(q_latent, q_pe, cache, plan.block_tables, plan.seq_lens, sm_scale, kv_scale,
                                max_seq_len=plan.max_seq_len)
