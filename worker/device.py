"""The choices that depend on the device, made once when a worker builds its model and cache.

`activation_dtype`: `dtype: auto` is bfloat16 on CUDA and float32 on CPU (where bfloat16 matmuls are
slow and the parity tests compare float32). `fp8_backend`: block-FP8 matrices stay FP8 and run on the
device's kernels (Triton on CUDA), or are dequantized at load (`kernels/backend.py` picks the kernels).
`memory_probe`: how the KV cache sizing reads device memory (None on CPU, which sizes by bytes).
Layers never ask which device they are on; they get what these functions chose.
"""

from __future__ import annotations

import torch

from k2serve.worker.config import EngineConfig
from k2serve.worker.kv_sizing import CudaMemoryProbe, MemoryProbe


def is_cuda(config: EngineConfig) -> bool:
    return torch.device(config.device).type == "cuda"


def activation_dtype(config: EngineConfig) -> torch.dtype:
    """The dtype of activations and of the latent cache."""
    if config.dtype == "auto":
        return torch.bfloat16 if is_cuda(config) else torch.float32
    return getattr(torch, config.dtype)


def fp8_backend(config: EngineConfig) -> str | None:
    """`load_model`'s fp8_backend: "auto" keeps FP8 matrices for the device's kernels, None dequantizes them."""
    keep = config.weight_format == "fp8" or (config.weight_format == "auto" and is_cuda(config))
    return "auto" if keep else None


def memory_probe(config: EngineConfig) -> MemoryProbe | None:
    """The CUDA allocator's view of the device, or None (CPU: the cache is sized by kv_cache_memory_bytes)."""
    return CudaMemoryProbe(torch.device(config.device)) if is_cuda(config) else None
