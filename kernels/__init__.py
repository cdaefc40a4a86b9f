"""FP8 and MLA attention kernels (Triton) with torch references; `select_backend` and
`select_attention_backend` pick the implementations per device.

It owns the block-FP8 arithmetic (quantization, GEMM, fused MoE experts), attention over the paged MLA
latent cache, and the argument checks of each kernel's wrapper. It must not import k2serve.router,
k2serve.worker or k2serve.cluster.
"""

from k2serve.kernels.backend import (
    Fp8Backend, TorchReferenceBackend, TritonBackend, select_attention_backend, select_backend,
)

__all__ = ["Fp8Backend", "TorchReferenceBackend", "TritonBackend", "select_attention_backend", "select_backend"]
