"""PlanConfig: what `k2serve plan` plans (GPU, group layout, workload) and the assumptions it states."""

from __future__ import annotations

from dataclasses import dataclass, field

from k2serve.cluster.efficiency import Efficiency

BF16 = 2
SHARED_EXPERT_LAYOUTS = ("replicated", "tp")
DISPATCH_DTYPES = ("fp8", "bf16")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class PlanConfig:
    """One worker group: W = `num_gpus` ranks (the EP size), attention TP over `tp_size` of them.

    `tp_size` divides W: W / tp_size attention partitions (data parallel), each with its own latent
    cache and batch. tp_size = W is today's layout (every rank holds H / W heads of every sequence),
    tp_size = 1 full data-parallel attention, anything between a hybrid.
    """

    gpu: str = "H200"
    num_gpus: int = 8  # ranks in the group = EP size
    tp_size: int = 8  # attention tensor parallelism; num_gpus / tp_size attention partitions
    shared_experts: str = "replicated"  # or "tp": split over the partition's tp ranks
    context_len: int = 32768  # max tokens per sequence (KV capacity in sequences)
    batch: int = 64  # target decode batch (sequences in the whole group)
    kv_len: int | None = None  # cached tokens per sequence in the decode step; None = context_len
    prefill_tokens: int = 8192  # tokens per prefill step in each attention partition
    prompt_len: int | None = None  # length of the prompts filling a prefill chunk; None = one prompt per chunk
    dispatch_dtype: str = "fp8"  # all-to-all payload: fp8 (+ fp32 scale per 128 channels) or bf16
    kv_dtype_bytes: int = BF16
    fixed_reserve_gib: float = 2.0  # CUDA context, NCCL buffers, GEMM workspace, fragmentation
    collective_latency_us: float = 10.0  # fixed cost of every collective (launch + synchronization)
    overlap: bool = False  # two micro-batches overlap compute with communication (TBO / DBO)
    rank_imbalance: float | None = None  # measured max/mean token copies per rank; None = uniform routing
    efficiency: Efficiency = field(default_factory=Efficiency)

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.tp_size < 1 or self.num_gpus % self.tp_size:
            raise ValueError(
                f"tp_size={self.tp_size} does not divide num_gpus={self.num_gpus}: attention TP must split the "
                f"group (the EP ranks) into equal partitions; choose tp_size from {divisors(max(self.num_gpus, 1))}"
            )
        if self.shared_experts not in SHARED_EXPERT_LAYOUTS:
            raise ValueError(f"shared_experts must be one of {SHARED_EXPERT_LAYOUTS}, got {self.shared_experts!r}")
        if self.dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch_dtype must be one of {DISPATCH_DTYPES}, got {self.dispatch_dtype!r}")
        if min(self.context_len, self.batch, self.prefill_tokens, self.prompt_len or 1) < 1:
            raise ValueError("context_len, batch, prefill_tokens and prompt_len must be >= 1")
        if self.rank_imbalance is not None and self.rank_imbalance < 1.0:
            raise ValueError(f"rank_imbalance is max over mean, so at least 1.0; got {self.rank_imbalance}")

    @property
    def dp_size(self) -> int:
        """Attention partitions (data-parallel replicas of attention) in the group."""
        return self.num_gpus // self.tp_size

    @property
    def decode_kv_len(self) -> int:
        return self.context_len if self.kv_len is None else self.kv_len

    @property
    def prefill_prompt_len(self) -> int:
        return self.prefill_tokens if self.prompt_len is None else self.prompt_len
