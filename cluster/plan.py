"""Capacity planner: memory per GPU, KV capacity and decode/prefill step times of one worker group.

Pure arithmetic on a ModelConfig, a PlanConfig and a GpuSpec (no torch). The pieces:
  cluster.plan_config  PlanConfig: the group layout (W ranks = EP, attention TP dividing W) and workload
  cluster.plan_weights weights per GPU under the layout, parameter counts, the MLA cache size
  cluster.expert_load  the slowest rank's expert load under top-k routing (not the mean)
  cluster.moe_wire     the all-to-all wire format (shared with benchmarks/moe_dispatch.py)
  cluster.plan_step    one step on the slowest rank: derated work, every collective, optional overlap
  cluster.efficiency   the derating and its published sources
KV capacity: each attention partition stores one latent per token of its own sequences, and every
rank of a partition holds the partition's whole cache (MLA's latent is shared by all heads), so the
group holds (free memory per GPU / bytes per token) x (W / tp) tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from k2serve.cluster.gpus import GIB, GpuSpec
from k2serve.cluster.moe_wire import WireFormat, bytes_per_token_per_layer
from k2serve.cluster.plan_config import PlanConfig
from k2serve.cluster.plan_step import StepCost, step_cost
from k2serve.cluster.plan_weights import (
    WeightKind,
    active_params,
    activation_bytes_per_token,
    kv_bytes_per_token,
    weight_kinds,
)
from k2serve.worker.model.config import ModelConfig

__all__ = ["DecodePoint", "Plan", "PlanConfig", "StepCost", "build_plan", "decode_point", "mixed_output_rate"]


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    step_ms: float
    tokens_per_s_per_gpu: float
    tokens_per_s_per_user: float
    bound: str
    fits_kv: bool


@dataclass(frozen=True)
class Plan:
    """Everything `k2serve plan` reports."""

    config: PlanConfig
    gpu: GpuSpec
    total_params: int
    active_params: int
    weights: tuple[WeightKind, ...]
    weights_per_gpu_bytes: float
    capacity_bytes: int
    reserve_bytes: float
    free_after_weights_bytes: float
    kv_bytes_per_token: int
    kv_tokens_per_gpu: int
    kv_tokens_per_group: int
    max_sequences: int
    fits: bool
    a2a_bytes_per_token_per_layer: float
    decode: StepCost
    prefill: StepCost
    sweep: tuple[DecodePoint, ...] = field(default=())

    @property
    def decode_tokens_per_s_per_gpu(self) -> float:
        return self.decode.tokens / self.decode.step_s / self.config.num_gpus

    @property
    def prefill_tokens_per_s_per_gpu(self) -> float:
        return self.prefill.tokens / self.prefill.step_s / self.config.num_gpus


def a2a_bytes_per_token_per_layer(m: ModelConfig, cfg: PlanConfig) -> float:
    """All-to-all bytes one token costs per MoE layer in the planned wire format (uniform routing)."""
    fmt = WireFormat.target(m.hidden_size, cfg.dispatch_dtype == "fp8")
    return bytes_per_token_per_layer(m.num_experts_per_tok, cfg.num_gpus, fmt).total


def reserve_bytes(m: ModelConfig, cfg: PlanConfig) -> float:
    """Workspace and activation reserve per GPU: a fixed part plus the activations of one prefill chunk."""
    return cfg.fixed_reserve_gib * GIB + cfg.prefill_tokens * activation_bytes_per_token(m)


def validate_layout(model: ModelConfig, cfg: PlanConfig) -> None:
    """The model-dependent divisibility rules, with messages that name the numbers."""
    if model.n_routed_experts % cfg.num_gpus:
        raise ValueError(f"n_routed_experts={model.n_routed_experts} is not divisible by num_gpus={cfg.num_gpus} (EP)")
    if model.num_attention_heads % cfg.tp_size:
        raise ValueError(f"num_attention_heads={model.num_attention_heads} is not divisible by tp_size={cfg.tp_size}")


def decode_point(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, batch: int, kv_tokens_per_group: int) -> DecodePoint:
    """Decode with `batch` sequences in the group, one new token each per step."""
    cost = step_cost(m, cfg, gpu, batch, cfg.decode_kv_len, prefill=False)
    return DecodePoint(
        batch=batch,
        step_ms=cost.step_s * 1e3,
        tokens_per_s_per_gpu=batch / cost.step_s / cfg.num_gpus,
        tokens_per_s_per_user=1.0 / cost.step_s,
        bound=cost.bound,
        fits_kv=batch * cfg.decode_kv_len <= kv_tokens_per_group,
    )


def sweep_batches(target: int, limit: int = 4096) -> list[int]:
    """Powers of two up to max(limit, target), plus the target batch."""
    batches = [2**i for i in range(int(math.log2(max(limit, target))) + 1)]
    return sorted(set(batches) | {target})


def mixed_output_rate(decode: StepCost, prefill: StepCost, batch: int, isl: int, osl: int, num_gpus: int) -> float:
    """Output tokens/s per GPU when `batch` requests of `isl` prompt and `osl` output tokens share the
    group (in-flight batching): each generation of requests costs `osl` decode steps at `batch` plus
    the prefill of batch x isl tokens at the prefill step's rate."""
    prefill_s = batch * isl * prefill.step_s / prefill.tokens
    return batch * osl / (osl * decode.step_s + prefill_s) / num_gpus


def build_plan(model: ModelConfig, cfg: PlanConfig, gpu: GpuSpec) -> Plan:
    """Memory, KV capacity, decode and prefill steps and a batch sweep for `model` on one group of `gpu`s."""
    validate_layout(model, cfg)
    kinds = weight_kinds(model, cfg.num_gpus, cfg.tp_size, cfg.shared_experts)
    weights_b = sum(k.bytes_per_gpu for k in kinds)
    reserve = reserve_bytes(model, cfg)
    kv_tok = kv_bytes_per_token(model, cfg.kv_dtype_bytes)
    kv_free = gpu.memory_bytes - weights_b - reserve
    kv_tokens_gpu = max(0, int(kv_free // kv_tok))
    kv_tokens_group = kv_tokens_gpu * cfg.dp_size
    max_seqs = kv_tokens_gpu // cfg.context_len * cfg.dp_size
    return Plan(
        config=cfg, gpu=gpu,
        total_params=sum(k.params for k in kinds), active_params=active_params(model),
        weights=kinds, weights_per_gpu_bytes=weights_b,
        capacity_bytes=gpu.memory_bytes, reserve_bytes=reserve,
        free_after_weights_bytes=gpu.memory_bytes - weights_b,
        kv_bytes_per_token=kv_tok, kv_tokens_per_gpu=kv_tokens_gpu, kv_tokens_per_group=kv_tokens_group,
        max_sequences=max_seqs, fits=kv_free > 0 and max_seqs >= 1,
        a2a_bytes_per_token_per_layer=a2a_bytes_per_token_per_layer(model, cfg),
        decode=step_cost(model, cfg, gpu, cfg.batch, cfg.decode_kv_len, prefill=False),
        prefill=step_cost(model, cfg, gpu, cfg.prefill_tokens * cfg.dp_size, 0, prefill=True),
        sweep=tuple(decode_point(model, cfg, gpu, b, kv_tokens_group) for b in sweep_batches(cfg.batch)),
    )
