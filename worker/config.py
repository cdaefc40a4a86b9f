"""EngineConfig: the serving engine's knobs (scheduler, KV cache, sampling limits), one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _f(default, description: str):
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class EngineConfig:
    """Configuration of one worker's Engine; every field has a default and a description."""

    max_num_seqs: int = _f(64, "Most requests running (holding KV blocks) at once.")
    max_num_batched_tokens: int = _f(2048, "Token budget of one step: decodes plus prefill chunks.")
    max_model_len: int | None = _f(None, "Longest prompt + output; None: the model's max_position_embeddings.")
    block_size: int = _f(16, "Tokens per KV cache block.")
    num_kv_blocks: int | None = _f(None, "KV cache blocks to allocate; None: derive from kv_cache_memory_bytes.")
    kv_cache_memory_bytes: int = _f(1 << 30, "Memory for the KV cache when num_kv_blocks is None (all layers).")
    enable_prefix_caching: bool = _f(True, "Reuse cached blocks of identical prompt prefixes.")
    max_num_waiting: int = _f(4096, "Most queued requests; beyond it submissions are rejected with 429.")
    max_top_logprobs: int = _f(20, "Largest top_logprobs a request may ask for.")
    default_max_tokens: int | None = _f(None, "max_tokens used when a request leaves it unset (None: to context end).")
    dtype: str = _f("float32", "Activation / KV cache dtype name (torch dtype attribute, e.g. bfloat16).")
    device: str = _f("cpu", "Torch device of the model and cache.")

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_num_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"EngineConfig.num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> description (for docs and the cluster config)."""
        return {f.name: f.metadata["description"] for f in fields(cls)}
