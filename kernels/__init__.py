"""FP8 kernels (Triton) with torch references; `select_backend` picks the implementation per device."""

from k2serve.kernels.backend import Fp8Backend, TorchReferenceBackend, TritonBackend, select_backend

__all__ = ["Fp8Backend", "TorchReferenceBackend", "TritonBackend", "select_backend"]
