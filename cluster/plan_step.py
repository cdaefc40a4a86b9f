"""StepCost: one forward step of a worker group, timed on its slowest rank, with every collective it issues.

A step is three kinds of work on each rank plus the collectives between them:
  dense      attention projections, the dense MLP, the shared expert, lm_head, router gate: weights
             read once per step, FP8 GEMMs over the rank's tokens (derated by `gemm_*`)
  attention  MLA over the latent cache: the absorbed form in decode (q.k over 576 dims, values over
             512), the expanded form in prefill (192 / 128 per head) with a causal average context
             (derated by `attention_*`); every rank of a TP partition reads the partition's whole cache
  experts    the slowest rank's routed experts (cluster.expert_load): its distinct experts' weights
             and its token copies (derated by `grouped_gemm_*`)
Each kind takes max(bytes / (HBM x efficiency), FLOPs / (peak x efficiency)); the step's compute is
their sum. Collectives (the target design of the data-parallel-attention worker), per step:
  every MoE layer   count exchange, dispatch, combine (all-to-all over the W ranks; bytes from
                    cluster.moe_wire for the slowest rank's copies); with tp > 1 also the partition's
                    reduce-scatter after o_proj and all-gather after the MoE
  every dense layer with tp > 1: two all-reduces (o_proj, MLP down) within the partition
  embedding, lm_head with tp > 1: an all-reduce and an all-gather of fp32 logits within the partition
Each collective costs bytes / (link bandwidth x `link` efficiency) + `collective_latency_us`.
Without overlap the step is compute + communication; with `overlap` (two micro-batches, as DeepSeek's
two-batch overlap) every collective runs twice at half the bytes and the step is the larger of the two.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.cluster.expert_load import ExpertLoad, expert_load
from k2serve.cluster.gpus import GpuSpec
from k2serve.cluster.moe_wire import WireFormat, all_to_all_bytes
from k2serve.cluster.plan_config import PlanConfig
from k2serve.cluster.plan_weights import (
    BF16,
    FP32,
    expert_params_bytes,
    kinds_by_name,
    kv_bytes_per_token,
    num_moe_layers,
    weight_kinds,
)
from k2serve.worker.model.config import ModelConfig


@dataclass(frozen=True)
class Work:
    """One kind of work on one rank for one step, with its derated times."""

    hbm_bytes: float
    fp8_flops: float
    bf16_flops: float
    memory_s: float
    flops_s: float

    @property
    def time_s(self) -> float:
        return max(self.memory_s, self.flops_s)


@dataclass(frozen=True)
class Collective:
    """One collective the worker issues `per_step` times per step, as the slowest rank sees it."""

    name: str
    group_size: int
    per_step: int
    bytes_each: float  # bytes the slowest rank sends or receives (the larger) in one call
    seconds_each: float

    @property
    def total_bytes(self) -> float:
        return self.per_step * self.bytes_each

    @property
    def total_s(self) -> float:
        return self.per_step * self.seconds_each


@dataclass(frozen=True)
class StepCost:
    """One step with `tokens` tokens in the group, on its slowest rank."""

    tokens: int
    dense: Work
    attention: Work
    experts: Work
    load: ExpertLoad
    collectives: tuple[Collective, ...]
    overlap: bool

    @property
    def hbm_bytes(self) -> float:
        return self.dense.hbm_bytes + self.attention.hbm_bytes + self.experts.hbm_bytes

    @property
    def flops(self) -> float:
        return sum(w.fp8_flops + w.bf16_flops for w in (self.dense, self.attention, self.experts))

    @property
    def compute_s(self) -> float:
        return self.dense.time_s + self.attention.time_s + self.experts.time_s

    @property
    def comm_s(self) -> float:
        return sum(c.total_s for c in self.collectives)

    @property
    def comm_bytes(self) -> float:
        return sum(c.total_bytes for c in self.collectives)

    @property
    def num_collectives(self) -> int:
        return sum(c.per_step for c in self.collectives)

    @property
    def step_s(self) -> float:
        if self.overlap:
            return max(self.compute_s, self.comm_s)
        return self.compute_s + self.comm_s

    @property
    def bound(self) -> str:
        """What dominates: "comm", else "memory" or "compute" by the summed derated times."""
        if self.comm_s > self.compute_s:
            return "comm"
        memory = self.dense.memory_s + self.attention.memory_s + self.experts.memory_s
        flops = self.dense.flops_s + self.attention.flops_s + self.experts.flops_s
        return "memory" if memory >= flops else "compute"


def link_bandwidth(gpu: GpuSpec, group_size: int) -> float:
    """Bytes/s for uniform all-to-all traffic: NVLink inside the domain, limited by RDMA beyond it."""
    if group_size <= gpu.nvlink_domain:
        return gpu.nvlink_bandwidth
    off_node = (group_size - gpu.nvlink_domain) / (group_size - 1)
    return min(gpu.nvlink_bandwidth / (1 - off_node), gpu.rdma_bandwidth / off_node)


def _work(gpu: GpuSpec, hbm: float, fp8: float, bf16: float, hbm_eff: float, flops_eff: float) -> Work:
    flops_s = (fp8 / gpu.fp8_flops + bf16 / gpu.bf16_flops) / flops_eff
    return Work(hbm, fp8, bf16, hbm / (gpu.hbm_bandwidth * hbm_eff), flops_s)


def _linear(m: ModelConfig, flops: float) -> tuple[float, float]:
    """(FP8, BF16) split of checkpoint-matrix FLOPs: FP8 when the checkpoint is block-quantized."""
    return (flops, 0.0) if m.weight_block_size is not None else (0.0, flops)


def dense_work(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, t_part: float, logit_tokens: float) -> Work:
    """Attention projections, dense MLP, shared expert, lm_head and router gate on one rank."""
    kinds = kinds_by_name(weight_kinds(m, cfg.num_gpus, cfg.tp_size, cfg.shared_experts))
    t_rank = t_part / cfg.tp_size  # MoE-side tokens of this rank (the partition's share after reduce-scatter)
    lm_head = kinds["embed_lm_head"]
    held = sum(kinds[n].bytes_per_gpu for n in ("attention", "dense_mlp", "shared_experts", "norms_router"))
    hbm = held + lm_head.bytes_per_gpu / 2 + t_part * m.hidden_size * BF16  # lm_head + looked-up embedding rows
    linear = 2 * t_part * (kinds["attention"].params_per_gpu + kinds["dense_mlp"].params_per_gpu)
    linear += 2 * t_rank * kinds["shared_experts"].params
    bf16 = 2 * logit_tokens * lm_head.params_per_gpu / 2
    bf16 += 2 * t_rank * num_moe_layers(m) * m.n_routed_experts * m.hidden_size  # router gate
    fp8, dense_bf16 = _linear(m, linear)
    eff = cfg.efficiency
    return _work(gpu, hbm, fp8, bf16 + dense_bf16, eff.gemm_hbm, eff.gemm_flops)


def attention_work(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, t_part: float, kv_len: int, prefill: bool) -> Work:
    """MLA over the latent cache for the partition's `t_part` tokens, on one of its ranks."""
    kv_tok = kv_bytes_per_token(m, cfg.kv_dtype_bytes)
    heads = m.num_attention_heads / cfg.tp_size
    if prefill:
        prompt = min(cfg.prefill_prompt_len, t_part)
        ctx, dims = kv_len + (prompt + 1) / 2, m.qk_head_dim + m.v_head_dim
        kv_read = t_part / prompt * kv_len * kv_tok  # each prompt reads its cached prefix once
    else:
        ctx, dims = kv_len, m.kv_cache_dim + m.kv_lora_rank
        kv_read = t_part * kv_len * kv_tok
    flops = 2 * t_part * heads * m.num_hidden_layers * ctx * dims
    eff = cfg.efficiency
    return _work(gpu, kv_read + t_part * kv_tok, 0.0, flops, eff.attention_hbm, eff.attention_flops)


def expert_work(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, load: ExpertLoad) -> Work:
    """The slowest rank's routed experts over all MoE layers: distinct experts read, copies computed."""
    params, nbytes = expert_params_bytes(m)
    n_moe = num_moe_layers(m)
    fp8, bf16 = _linear(m, 2 * load.max_copies * params * n_moe)
    eff = cfg.efficiency
    return _work(gpu, load.max_experts * nbytes * n_moe, fp8, bf16, eff.grouped_gemm_hbm, eff.grouped_gemm_flops)


def _collective(name: str, group: int, per_step: int, nbytes: float, gpu: GpuSpec, cfg: PlanConfig) -> Collective:
    if cfg.overlap:  # two micro-batches: each collective twice, half the bytes each time
        per_step, nbytes = 2 * per_step, nbytes / 2
    seconds = nbytes / (link_bandwidth(gpu, group) * cfg.efficiency.link) + cfg.collective_latency_us * 1e-6
    return Collective(name, group, per_step, nbytes, seconds)


def moe_collectives(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, load: ExpertLoad) -> list[Collective]:
    """Count exchange, dispatch and combine of every MoE layer, sized for the slowest rank's copies."""
    w, n_moe = cfg.num_gpus, num_moe_layers(m)
    if w == 1:
        return []
    fmt = WireFormat.target(m.hidden_size, cfg.dispatch_dtype == "fp8")
    remote = all_to_all_bytes(load.max_copies * (w - 1) / w, w, fmt, count_exchange=False)
    return [
        _collective("moe count exchange", w, n_moe, (w - 1) * fmt.count_bytes, gpu, cfg),
        _collective("moe dispatch", w, n_moe, remote.dispatch + remote.routing, gpu, cfg),
        _collective("moe combine", w, n_moe, remote.combine, gpu, cfg),
    ]


def tp_collectives(
    m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, t_part: float, logit_tokens: float
) -> list[Collective]:
    """The attention partition's collectives (none at tp = 1): bf16 hidden rows, fp32 logits."""
    tp = cfg.tp_size
    if tp == 1:
        return []
    n_moe = num_moe_layers(m)
    n_dense = m.num_hidden_layers - n_moe
    rows = t_part * m.hidden_size * BF16
    share = (tp - 1) / tp
    out = [
        _collective("attn reduce-scatter (MoE layers)", tp, n_moe, share * rows, gpu, cfg),
        _collective("attn all-gather (MoE layers)", tp, n_moe, share * rows, gpu, cfg),
        _collective("embedding all-reduce", tp, 1, 2 * share * rows, gpu, cfg),
        _collective("lm_head logits all-gather", tp, 1, share * logit_tokens * m.vocab_size * FP32, gpu, cfg),
    ]
    if n_dense:
        dense = _collective("dense-layer all-reduce (o_proj, MLP)", tp, 2 * n_dense, 2 * share * rows, gpu, cfg)
        out.insert(2, dense)
    return out


def step_cost(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, tokens: int, kv_len: int, prefill: bool) -> StepCost:
    """One step with `tokens` tokens in the group (split evenly over the partitions), each attending to
    `kv_len` cached tokens (decode) or a chunk of prompts after `kv_len` cached tokens (prefill)."""
    t_part = tokens / cfg.dp_size
    logit_tokens = t_part / min(cfg.prefill_prompt_len, t_part) if prefill else t_part
    load = expert_load(m.n_routed_experts, m.num_experts_per_tok, cfg.num_gpus, tokens, cfg.rank_imbalance)
    collectives = moe_collectives(m, cfg, gpu, load) + tp_collectives(m, cfg, gpu, t_part, logit_tokens)
    return StepCost(
        tokens=tokens,
        dense=dense_work(m, cfg, gpu, t_part, logit_tokens),
        attention=attention_work(m, cfg, gpu, t_part, kv_len, prefill),
        experts=expert_work(m, cfg, gpu, load),
        load=load,
        collectives=tuple(collectives),
        overlap=cfg.overlap,
    )
