"""The choices that depend on the device, made once when a worker builds its model and cache.

`activation_dtype`: `dtype: auto` is bfloat16 on CUDA and float32 on CPU (where bfloat16 matmuls are
slow and the parity tests compare float32). `cache_dtype`: the latent cache stores the activation dtype
or, with `kv_cache_dtype: fp8_e4m3`, FP8 (kernels/latent_cache.py). `fp8_backend`: block-FP8 matrices stay
FP8 and run on the device's kernels (Triton on CUDA), or are dequantized at load. `attention_backend`: the
MLA attention implementation for the device. `kernels/backend.py` picks the kernels of both.
`memory_probe`: how the KV cache sizing reads device memory (None on CPU, which sizes by bytes).
Layers never ask which device they are on; they get what these functions chose (worker/runner_loader.py
calls each once per runner).
"""

from __future__ import annotations

import torch

from k2serve.kernels.attention_backend import MLABackend
from k2serve.kernels.backend import select_attention_backend
from k2serve.kernels.latent_cache import kv_cache_dtype
from k2serve.worker.config import EngineConfig
from k2serve.worker.kv_sizing import CudaMemoryProbe, MemoryProbe


def is_cuda(config: EngineConfig) -> bool:
    return torch.device(config.device).type == "cuda"


def activation_dtype(config: EngineConfig) -> torch.dtype:
    """The dtype of activations (and of the latent cache unless it is FP8)."""
    if config.dtype == "auto":
        return torch.bfloat16 if is_cuda(config) else torch.float32
    return getattr(torch, config.dtype)


def cache_dtype(config: EngineConfig) -> torch.dtype:
    """The latent cache's storage dtype: what its block size in bytes and the runner's caches use."""
    return kv_cache_dtype(config.kv_cache_dtype, activation_dtype(config))


def attention_backend(config: EngineConfig) -> MLABackend:
    """MLA attention over the paged latent cache: the Triton kernels on CUDA, batched torch on CPU."""
    return select_attention_backend(torch.device(config.device))


def fp8_backend(config: EngineConfig) -> str | None:
    """`load_model`'s fp8_backend: "auto" keeps FP8 matrices for the device's kernels, None dequantizes them."""
    keep = config.weight_format == "fp8" or (config.weight_format == "auto" and is_cuda(config))
    return "auto" if keep else None


def memory_probe(config: EngineConfig) -> MemoryProbe | None:
    """The CUDA allocator's view of the device, or None (CPU: the cache is sized by kv_cache_memory_bytes)."""
    return CudaMemoryProbe(torch.device(config.device)) if is_cuda(config) else None
