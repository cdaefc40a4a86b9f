"""Capacity planner: memory per GPU, KV capacity and a decode/prefill roofline for one worker group.

Pure arithmetic on a ModelConfig and a GpuSpec (no torch). Layout (DESIGN section 3): attention is
tensor parallel over `tp_size` ranks (`dp = num_gpus / tp_size` attention replicas; tp_size=1 is
data-parallel attention); q_a_proj and kv_a_proj_with_mqa are replicated (their outputs are the
shared latents), q_b/kv_b/o_proj are split by head. Routed experts are split by expert over all
`num_gpus` ranks (EP = group size). The dense MLP and the vocab-parallel embedding and lm_head are split
over all ranks. The shared expert is replicated (each rank runs its own token shard) or split ("tp").
Weights follow the checkpoint: block-FP8 matrices plus one float32 scale per 128x128 block; embeddings,
lm_head, norms and the router gate in bf16; the router bias in fp32. Multi-token-prediction layers
are not counted (K2 has none; DeepSeek-V3's 671B also excludes its MTP module).

Parameter counts: "active" = attention + dense MLP + shared experts + num_experts_per_tok routed
experts per MoE layer + embed_tokens + lm_head + norms + router gate (K2: 32.9B, DeepSeek-V3: 37.6B).
Roofline: step time = max(HBM bytes / bandwidth, FP8 FLOPs / FP8 peak + BF16 FLOPs / BF16 peak)
+ communication (reduce-scatter/all-gather for TP attention, all-to-all dispatch + combine per MoE
layer), communication NOT overlapped, each collective paying `collective_latency_us`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from k2serve.cluster.gpus import GIB, GpuSpec
from k2serve.worker.model.config import ModelConfig

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class PlanConfig:
    """What to plan: GPU type, group shape, sequence shape, and the stated assumptions."""

    gpu: str = "H200"
    num_gpus: int = 8  # GPUs per worker group = EP size
    tp_size: int = 8  # attention tensor parallelism; num_gpus / tp_size attention replicas
    shared_experts: str = "replicated"  # or "tp"
    context_len: int = 32768  # max tokens per sequence (KV capacity in sequences)
    batch: int = 64  # target decode batch (sequences in the group)
    kv_len: int | None = None  # cached tokens per sequence in the decode roofline; None = context_len
    prefill_tokens: int = 8192  # tokens per prefill step (one chunk)
    dispatch_dtype: str = "fp8"  # all-to-all dispatch payload: fp8 (+ fp32 scale per 128) or bf16
    kv_dtype_bytes: int = BF16
    fixed_reserve_gib: float = 2.0  # CUDA context, NCCL buffers, GEMM workspace, fragmentation
    collective_latency_us: float = 10.0  # fixed cost per collective (launch + synchronization)

    def __post_init__(self) -> None:
        if self.num_gpus % self.tp_size:
            raise ValueError(f"num_gpus={self.num_gpus} is not a multiple of tp_size={self.tp_size}")
        if self.shared_experts not in ("replicated", "tp"):
            raise ValueError(f"shared_experts must be 'replicated' or 'tp', got {self.shared_experts!r}")
        if self.dispatch_dtype not in ("fp8", "bf16"):
            raise ValueError(f"dispatch_dtype must be 'fp8' or 'bf16', got {self.dispatch_dtype!r}")
        if min(self.context_len, self.batch, self.prefill_tokens) < 1:
            raise ValueError("context_len, batch and prefill_tokens must be >= 1")

    @property
    def dp_size(self) -> int:
        return self.num_gpus // self.tp_size

    @property
    def decode_kv_len(self) -> int:
        return self.context_len if self.kv_len is None else self.kv_len


@dataclass(frozen=True)
class WeightKind:
    """One kind of weight: its parameter count, bytes in the checkpoint, and bytes held per GPU."""

    name: str
    params: int
    bytes_total: int
    params_per_gpu: float
    bytes_per_gpu: float


@dataclass(frozen=True)
class StepCost:
    """Roofline of one forward step on one GPU."""

    tokens: int
    hbm_bytes: float
    fp8_flops: float
    bf16_flops: float
    comm_bytes: float
    memory_s: float
    compute_s: float
    comm_s: float
    bound: str  # "memory" or "compute" (before communication)

    @property
    def step_s(self) -> float:
        return max(self.memory_s, self.compute_s) + self.comm_s


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
    a2a_bytes_per_token_per_layer: int
    a2a_ms_per_layer_nvlink: float
    a2a_ms_per_layer_rdma: float
    decode: StepCost
    prefill: StepCost
    sweep: tuple[DecodePoint, ...] = field(default=())


def fp8_matrix_bytes(rows: int, cols: int, block: tuple[int, int]) -> int:
    """e4m3 data plus the float32 scale grid [ceil(rows/bn), ceil(cols/bk)]."""
    return rows * cols + FP32 * math.ceil(rows / block[0]) * math.ceil(cols / block[1])


def _matrices_bytes(shapes: list[tuple[int, int]], model: ModelConfig) -> tuple[int, int]:
    """(params, bytes) of block-FP8 matrices (bf16 when the checkpoint is not quantized)."""
    params = sum(r * c for r, c in shapes)
    if model.weight_block_size is None:
        return params, BF16 * params
    return params, sum(fp8_matrix_bytes(r, c, model.weight_block_size) for r, c in shapes)


def attention_shapes(m: ModelConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Per-layer MLA matrices as [out, in]: (replicated under TP, split by head under TP)."""
    heads = m.num_attention_heads
    kv_a = (m.kv_lora_rank + m.qk_rope_head_dim, m.hidden_size)
    kv_b = (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    o = (m.hidden_size, heads * m.v_head_dim)
    if m.q_lora_rank is None:
        return [kv_a], [(heads * m.qk_head_dim, m.hidden_size), kv_b, o]
    return [(m.q_lora_rank, m.hidden_size), kv_a], [(heads * m.qk_head_dim, m.q_lora_rank), kv_b, o]


def mlp_shapes(intermediate: int, hidden: int) -> list[tuple[int, int]]:
    """SwiGLU gate, up, down as [out, in]."""
    return [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]


def num_moe_layers(m: ModelConfig) -> int:
    return sum(m.is_moe_layer(i) for i in range(m.num_hidden_layers))


def weight_kinds(m: ModelConfig, cfg: PlanConfig) -> tuple[WeightKind, ...]:
    """Parameters and bytes of each kind of weight, whole model and per GPU under the layout."""
    w, tp = cfg.num_gpus, cfg.tp_size
    n_moe = num_moe_layers(m)
    n_dense = m.num_hidden_layers - n_moe
    layers = m.num_hidden_layers
    rep_p, rep_b = _matrices_bytes(attention_shapes(m)[0], m)
    split_p, split_b = _matrices_bytes(attention_shapes(m)[1], m)
    dense_p, dense_b = _matrices_bytes(mlp_shapes(m.intermediate_size, m.hidden_size), m)
    shared_p, shared_b = _matrices_bytes(mlp_shapes(m.moe_intermediate_size * m.n_shared_experts, m.hidden_size), m)
    expert_p, expert_b = _matrices_bytes(mlp_shapes(m.moe_intermediate_size, m.hidden_size), m)
    embed_p = 2 * m.vocab_size * m.hidden_size if not m.tie_word_embeddings else m.vocab_size * m.hidden_size
    q_norm = m.q_lora_rank or 0
    norm_p = layers * (2 * m.hidden_size + q_norm + m.kv_lora_rank) + m.hidden_size
    gate_p = n_moe * m.n_routed_experts * m.hidden_size
    bias_p = n_moe * m.n_routed_experts
    shared_div = 1 if cfg.shared_experts == "replicated" else w
    routed_p, routed_b = n_moe * m.n_routed_experts * expert_p, n_moe * m.n_routed_experts * expert_b
    small_p, small_b = norm_p + gate_p + bias_p, BF16 * (norm_p + gate_p) + FP32 * bias_p
    return (
        WeightKind("attention", layers * (rep_p + split_p), layers * (rep_b + split_b),
                   layers * (rep_p + split_p / tp), layers * (rep_b + split_b / tp)),
        WeightKind("dense_mlp", n_dense * dense_p, n_dense * dense_b, n_dense * dense_p / w, n_dense * dense_b / w),
        WeightKind("shared_experts", n_moe * shared_p, n_moe * shared_b,
                   n_moe * shared_p / shared_div, n_moe * shared_b / shared_div),
        WeightKind("routed_experts", routed_p, routed_b, routed_p / w, routed_b / w),
        WeightKind("embed_lm_head", embed_p, BF16 * embed_p, embed_p / w, BF16 * embed_p / w),
        WeightKind("norms_router", small_p, small_b, small_p, small_b),
    )


def active_params(m: ModelConfig) -> int:
    """Parameters one token touches (see the module docstring for the definition)."""
    kinds = {k.name: k for k in weight_kinds(m, PlanConfig(num_gpus=1, tp_size=1))}
    n_moe = num_moe_layers(m)
    expert_p = 3 * m.moe_intermediate_size * m.hidden_size
    routed = n_moe * m.num_experts_per_tok * expert_p
    return sum(k.params for name, k in kinds.items() if name != "routed_experts") + routed


def kv_bytes_per_token(m: ModelConfig, dtype_bytes: int = BF16) -> int:
    """MLA latent cache per token over all layers: (kv_lora_rank + qk_rope_head_dim) * layers * bytes."""
    return m.kv_cache_dim * m.num_hidden_layers * dtype_bytes


def expected_distinct_experts(n_local: int, n_experts: int, top_k: int, batch_tokens: int) -> float:
    """E[distinct local experts hit] = n_local * (1 - (1 - k/E)^tokens), routing assumed uniform."""
    return n_local * (1.0 - (1.0 - top_k / n_experts) ** batch_tokens)


def reserve_bytes(m: ModelConfig, cfg: PlanConfig) -> float:
    """Workspace and activation reserve: a fixed part plus the activations of one prefill chunk.

    Per token: 8 hidden-sized bf16 buffers (residual, norm output, attention output, MoE output and
    their all-gather/all-to-all copies) plus the routed experts' gate/up outputs for its k copies."""
    per_token = BF16 * (8 * m.hidden_size + 2 * m.num_experts_per_tok * m.moe_intermediate_size)
    return cfg.fixed_reserve_gib * GIB + cfg.prefill_tokens * per_token


def dispatch_bytes_per_copy(m: ModelConfig, dtype: str) -> int:
    """One token copy sent to an expert's rank: fp8 values + one fp32 scale per 128 channels, or bf16."""
    if dtype == "bf16":
        return BF16 * m.hidden_size
    return m.hidden_size + FP32 * math.ceil(m.hidden_size / 128)


def a2a_bytes_per_token_per_layer(m: ModelConfig, dtype: str) -> int:
    """Dispatch + combine bytes for one token in one MoE layer (k copies each way, combine in bf16)."""
    return m.num_experts_per_tok * (dispatch_bytes_per_copy(m, dtype) + BF16 * m.hidden_size)


def link_bandwidth(gpu: GpuSpec, num_gpus: int) -> float:
    """Bytes/s for uniform all-to-all traffic: NVLink inside the domain, limited by RDMA beyond it."""
    if num_gpus <= gpu.nvlink_domain:
        return gpu.nvlink_bandwidth
    off_node = (num_gpus - gpu.nvlink_domain) / (num_gpus - 1)
    return min(gpu.nvlink_bandwidth / (1 - off_node), gpu.rdma_bandwidth / off_node)


def _kinds(m: ModelConfig, cfg: PlanConfig) -> dict[str, WeightKind]:
    return {k.name: k for k in weight_kinds(m, cfg)}


def _weight_bytes_touched(m: ModelConfig, cfg: PlanConfig, tokens: int) -> float:
    """HBM bytes of weights read in one step on one GPU: every non-expert weight held, the
    expected distinct local experts hit by `tokens` tokens, the embedding rows looked up."""
    kinds = _kinds(m, cfg)
    expert_b = _matrices_bytes(mlp_shapes(m.moe_intermediate_size, m.hidden_size), m)[1]
    n_local = m.n_routed_experts / cfg.num_gpus
    distinct = expected_distinct_experts(n_local, m.n_routed_experts, m.num_experts_per_tok, tokens)
    held = sum(k.bytes_per_gpu for k in kinds.values() if k.name not in ("routed_experts", "embed_lm_head"))
    lm_head = kinds["embed_lm_head"].bytes_per_gpu / 2
    embed_rows = tokens / cfg.dp_size * m.hidden_size * BF16
    return held + lm_head + embed_rows + distinct * expert_b * num_moe_layers(m)


def _flops(m: ModelConfig, cfg: PlanConfig, tokens: int, kv_len: int, prefill: bool) -> tuple[float, float]:
    """(FP8 FLOPs, BF16 FLOPs) of one step on one GPU. Decode attention uses the absorbed MLA form
    (q.k over kv_lora_rank + rope dims, values over kv_lora_rank); prefill the expanded form
    (q.k over qk_head_dim, values over v_head_dim) with a causal average context."""
    kinds, w = _kinds(m, cfg), cfg.num_gpus
    t_attn = tokens / cfg.dp_size  # tokens each attention rank computes
    heads_local = m.num_attention_heads / cfg.tp_size
    if prefill:
        ctx, dims = kv_len + (t_attn + 1) / 2, m.qk_head_dim + m.v_head_dim
    else:
        ctx, dims = kv_len, m.kv_cache_dim + m.kv_lora_rank
    attn_core = 2 * t_attn * heads_local * m.num_hidden_layers * ctx * dims
    expert_p = 3 * m.moe_intermediate_size * m.hidden_size
    linear = (2 * t_attn * kinds["attention"].params_per_gpu
              + 2 * tokens / w * (kinds["dense_mlp"].params + kinds["shared_experts"].params)
              + 2 * tokens / w * m.num_experts_per_tok * expert_p * num_moe_layers(m))
    logit_tokens = 1 if prefill else tokens
    bf16 = attn_core + 2 * logit_tokens * kinds["embed_lm_head"].params / 2 / w
    bf16 += 2 * tokens / w * num_moe_layers(m) * m.n_routed_experts * m.hidden_size  # router gate
    if m.weight_block_size is None:
        return 0.0, bf16 + linear
    return linear, bf16


def _collective_s(nbytes: float, bandwidth: float, cfg: PlanConfig) -> float:
    return nbytes / bandwidth + cfg.collective_latency_us * 1e-6


def _comm(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, tokens: int) -> tuple[float, float]:
    """(bytes sent per GPU, seconds) of one step's collectives (see the module docstring)."""
    w, tp = cfg.num_gpus, cfg.tp_size
    n_moe = num_moe_layers(m)
    hidden_b = m.hidden_size * BF16
    total_b = total_s = 0.0
    if tp > 1:  # reduce-scatter after o_proj + all-gather before the next attention, every layer
        per = (tp - 1) / tp * tokens / cfg.dp_size * hidden_b
        total_b += 2 * per * m.num_hidden_layers
        total_s += 2 * _collective_s(per, link_bandwidth(gpu, tp), cfg) * m.num_hidden_layers
    if w > 1 and tp < w:  # dense layers run their MLP over all ranks: all-gather + reduce-scatter
        per = (w - 1) / w * tokens * hidden_b
        total_b += 2 * per * (m.num_hidden_layers - n_moe)
        total_s += 2 * _collective_s(per, link_bandwidth(gpu, w), cfg) * (m.num_hidden_layers - n_moe)
    if w > 1:  # MoE all-to-all: dispatch + combine
        copies = tokens / w * m.num_experts_per_tok * (w - 1) / w
        bw = link_bandwidth(gpu, w)
        dispatch = copies * dispatch_bytes_per_copy(m, cfg.dispatch_dtype)
        combine = copies * hidden_b
        total_b += (dispatch + combine) * n_moe
        total_s += (_collective_s(dispatch, bw, cfg) + _collective_s(combine, bw, cfg)) * n_moe
    return total_b, total_s


def step_cost(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, tokens: int, kv_len: int, prefill: bool) -> StepCost:
    """Roofline of one step with `tokens` tokens in the group, each attending to `kv_len` cached
    tokens (decode) or a `tokens`-long chunk after `kv_len` cached tokens (prefill)."""
    kv_tok = kv_bytes_per_token(m, cfg.kv_dtype_bytes)
    t_attn = tokens / cfg.dp_size
    kv_read = kv_tok * (kv_len if prefill else t_attn * kv_len)
    hbm = _weight_bytes_touched(m, cfg, tokens) + kv_read + kv_tok * t_attn
    fp8, bf16 = _flops(m, cfg, tokens, kv_len, prefill)
    comm_b, comm_s = _comm(m, cfg, gpu, tokens)
    memory_s = hbm / gpu.hbm_bandwidth
    compute_s = fp8 / gpu.fp8_flops + bf16 / gpu.bf16_flops
    bound = "memory" if memory_s >= compute_s else "compute"
    return StepCost(tokens, hbm, fp8, bf16, comm_b, memory_s, compute_s, comm_s, bound)


def decode_point(m: ModelConfig, cfg: PlanConfig, gpu: GpuSpec, batch: int, kv_tokens_per_group: int) -> DecodePoint:
    """Decode throughput with `batch` sequences in the group, one new token each per step."""
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


def build_plan(model: ModelConfig, cfg: PlanConfig, gpu: GpuSpec) -> Plan:
    """Memory, KV capacity, roofline and a batch sweep for `model` on one group of `gpu`s."""
    if model.n_routed_experts % cfg.num_gpus:
        raise ValueError(f"n_routed_experts={model.n_routed_experts} is not divisible by num_gpus={cfg.num_gpus} (EP)")
    if model.num_attention_heads % cfg.tp_size:
        raise ValueError(f"num_attention_heads={model.num_attention_heads} is not divisible by tp_size={cfg.tp_size}")
    kinds = weight_kinds(model, cfg)
    weights_b = sum(k.bytes_per_gpu for k in kinds)
    reserve = reserve_bytes(model, cfg)
    kv_tok = kv_bytes_per_token(model, cfg.kv_dtype_bytes)
    kv_free = gpu.memory_bytes - weights_b - reserve
    kv_tokens_gpu = max(0, int(kv_free // kv_tok))
    kv_tokens_group = kv_tokens_gpu * cfg.dp_size
    max_seqs = kv_tokens_gpu // cfg.context_len * cfg.dp_size
    a2a_tok = a2a_bytes_per_token_per_layer(model, cfg.dispatch_dtype)
    a2a_rank = cfg.batch / cfg.num_gpus * a2a_tok * (cfg.num_gpus - 1) / cfg.num_gpus
    lat = 2 * cfg.collective_latency_us * 1e-6
    return Plan(
        config=cfg, gpu=gpu,
        total_params=sum(k.params for k in kinds), active_params=active_params(model),
        weights=kinds, weights_per_gpu_bytes=weights_b,
        capacity_bytes=gpu.memory_bytes, reserve_bytes=reserve,
        free_after_weights_bytes=gpu.memory_bytes - weights_b,
        kv_bytes_per_token=kv_tok, kv_tokens_per_gpu=kv_tokens_gpu, kv_tokens_per_group=kv_tokens_group,
        max_sequences=max_seqs, fits=kv_free > 0 and max_seqs >= 1,
        a2a_bytes_per_token_per_layer=a2a_tok,
        a2a_ms_per_layer_nvlink=(a2a_rank / gpu.nvlink_bandwidth + lat) * 1e3,
        a2a_ms_per_layer_rdma=(a2a_rank / gpu.rdma_bandwidth + lat) * 1e3,
        decode=step_cost(model, cfg, gpu, cfg.batch, cfg.decode_kv_len, prefill=False),
        prefill=step_cost(model, cfg, gpu, cfg.prefill_tokens, 0, prefill=True),
        sweep=tuple(decode_point(model, cfg, gpu, b, kv_tokens_group) for b in sweep_batches(cfg.batch)),
    )
