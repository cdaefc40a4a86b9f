"""Efficiency: the fractions of datasheet peaks that shipped kernels reach, used to derate the roofline.

A roofline divides bytes by peak bandwidth and FLOPs by peak FLOP/s; real kernels reach a fraction of
either. The defaults are what the best published kernels for this model family report on Hopper,
each against that GPU's dense datasheet peak (H800: 3.35 TB/s HBM, 1,979 FP8 / 989 BF16 TFLOP/s,
NVLink 200 GB/s per direction; B200: 900 GB/s per direction):

  attention_hbm       0.90  FlashMLA decode: "up to 3000 GB/s in memory-bound configuration" on H800
                            SXM5 (github.com/deepseek-ai/FlashMLA README).
  attention_flops     0.60  FlashMLA: 580 TFLOPS compute-bound on H800 (the same README; 660 after its
                            2025-04 update).
  gemm_hbm            0.70  DeepGEMM dense FP8 GEMMs at 64-128 rows (decode): 1,509-2,668 GB/s on H800
                            (github.com/deepseek-ai/DeepGEMM README, "Normal GEMMs for dense models").
  gemm_flops          0.65  DeepGEMM at 4,096 rows: 990-1,358 TFLOPS (same table); "up to 1550 TFLOPS"
                            is its best shape.
  grouped_gemm_hbm    0.60  DeepGEMM masked grouped GEMM (decode MoE, few tokens per expert): about
                            2,050 GB/s at 256 rows per group, under 1,000 GB/s at 1,024 (same README).
  grouped_gemm_flops  0.55  DeepGEMM grouped GEMMs: 815-1,297 TFLOPS (contiguous and masked tables).
  link                0.75  DeepEP intranode EP8 dispatch/combine: 153/158 GB/s on H800 NVLink
                            (github.com/deepseek-ai/DeepEP docs/legacy.md); DeepEP V2 on SM100 EP8:
                            726/740 GB/s logical, local traffic included (DeepEP README). Applied to
                            every collective, NVLink or RDMA.

`Efficiency.ideal()` (all 1.0) is the pure roofline, an upper bound no engine reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of each peak (see the module docstring for the sources of the defaults)."""

    attention_hbm: float = 0.90  # MLA decode kernel reading the latent cache
    attention_flops: float = 0.60  # MLA attention math (BF16)
    gemm_hbm: float = 0.70  # dense FP8 GEMMs reading weights at small batch
    gemm_flops: float = 0.65  # dense FP8 GEMMs at large batch
    grouped_gemm_hbm: float = 0.60  # expert GEMMs reading expert weights, few tokens per expert
    grouped_gemm_flops: float = 0.55  # expert GEMMs at many tokens per expert
    link: float = 0.75  # NVLink / RDMA bandwidth a collective achieves

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"efficiency {f.name}={value} must be in (0, 1]")

    @classmethod
    def ideal(cls) -> "Efficiency":
        """Every peak reached: the roofline without derating."""
        return cls(**{f.name: 1.0 for f in fields(cls)})
