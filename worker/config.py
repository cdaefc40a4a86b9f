"""EngineConfig: the serving engine's knobs (scheduler, KV cache, sampling limits), one frozen pydantic model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# The names kernels.latent_cache maps to torch dtypes (this module imports no torch: the scheduler uses it).
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


class EngineConfig(BaseModel):
    """Configuration of one worker's Engine; every field has a default and a description."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(64, ge=1, description="Most requests running (holding KV blocks) at once.")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget of one step: decodes plus prefill chunks.")
    max_model_len: int | None = Field(
        None, description="Longest prompt + output; None: the model's max_position_embeddings.")
    block_size: int = Field(16, ge=1, description="Tokens per KV cache block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV cache blocks to allocate; None: derive from kv_cache_memory_bytes.")
    kv_cache_memory_bytes: int = Field(
        1 << 30, description="Memory for the KV cache when num_kv_blocks is None (all layers).")
    kv_cache_fraction: float = Field(
        0.9, gt=0, le=1, description="CUDA: fraction of the device's total memory this rank may use; the KV cache "
        "gets it minus what is in use after loading (weights, CUDA context, other processes) and the peak of a "
        "profiled step at max_num_batched_tokens. CPU uses kv_cache_memory_bytes; num_kv_blocks overrides both.")
    enable_prefix_caching: bool = Field(True, description="Reuse cached blocks of identical prompt prefixes.")
    max_num_waiting: int = Field(
        4096, ge=1, description="Most queued requests; beyond it submissions are rejected with 429.")
    max_top_logprobs: int = Field(20, description="Largest top_logprobs a request may ask for.")
    default_max_tokens: int | None = Field(
        None, description="max_tokens used when a request leaves it unset (None: to context end).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Activation dtype, and the KV cache's unless kv_cache_dtype is fp8_e4m3: auto "
        "(bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16.")
    device: str = Field("cpu", description="Torch device of the model and cache.")
    weight_format: Literal["auto", "fp8", "dense"] = Field(
        "auto", description="How matrices stored as block-FP8 are held: fp8 (as stored, multiplied by the device's "
        "FP8 kernels), dense (dequantized to dtype at load), auto (fp8 on CUDA, dense on CPU).")
    kv_cache_dtype: Literal[KV_CACHE_DTYPES] = Field(
        "auto", description="Latent KV cache storage: auto (the activation dtype) or fp8_e4m3 (half the bytes of "
        "bf16, so twice the tokens in the same memory; per-tensor scale 1.0, values clamped to +-448).")
