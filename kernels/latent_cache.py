"""Storage formats of the paged MLA latent cache: the activation dtype, or FP8 e4m3 with a per-tensor scale.

An FP8 cache halves the KV bytes (Kimi K2: 61 layers x 576 values = 70,272 bytes per token in bf16,
35,136 in e4m3). It stores `clamp(value / kv_scale, -448, 448)` as float8_e4m3fn; readers multiply by
`kv_scale`. The scale is one number per cache, `FP8_KV_SCALE = 1.0` (what vLLM and SGLang use for
DeepSeek MLA without calibrated scales): the latent half is RMS-normalised by kv_a_layernorm, so its
entries are of the order of that norm's weights, and k_rope is a rotated projection of a normalised hidden
state; both sit well inside e4m3's normal range [2^-6, 448], where rounding keeps 3 mantissa bits (relative
error <= 2^-4). Values beyond +-448 saturate instead of becoming NaN.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0
FP8_KV_SCALE = 1.0
# Names accepted by EngineConfig.kv_cache_dtype: "auto" stores the activation dtype.
KV_CACHE_DTYPES = {"auto": None, "fp8_e4m3": FP8_KV_DTYPE}


def kv_cache_dtype(name: str, activation_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of a cache named `name` for a model computing in `activation_dtype`."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose one of {sorted(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name] or activation_dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def quantize(values: torch.Tensor, cache_dtype: torch.dtype, kv_scale: float) -> torch.Tensor:
    """`values` in the cache's storage format (a plain cast unless the cache is FP8)."""
    if not is_fp8(cache_dtype):
        return values.to(cache_dtype)
    return (values.float() / kv_scale).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(cache_dtype)


def dequantize(stored: torch.Tensor, kv_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries in `dtype` (FP8 entries are multiplied by `kv_scale`)."""
    if not is_fp8(stored.dtype):
        return stored.to(dtype)
    return (stored.float() * kv_scale).to(dtype) if kv_scale != 1.0 else stored.to(dtype)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as bytes: indexing kernels cover uint8 on every device, float8 not everywhere."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def store(cache: torch.Tensor, slot_mapping: torch.Tensor, entries: torch.Tensor, kv_scale: float) -> None:
    """Write entries [T, D] into the flat slots [T] (block_id * block_size + offset) of cache [N, bs, D]."""
    _raw(cache).view(-1, cache.shape[-1])[slot_mapping] = _raw(quantize(entries, cache.dtype, kv_scale))


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Whole blocks [n, bs, D] of cache [N, bs, D], in the order of `blocks` [n] (int64), still stored."""
    return _raw(cache).index_select(0, blocks).view(cache.dtype)
