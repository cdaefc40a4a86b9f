"""GpuSpec: the public numbers of the GPUs `k2serve plan` knows, each with its source.

Units are SI base units: bytes, bytes/s, FLOP/s. Memory is the capacity the CUDA driver reports
(`nvidia-smi` "MiB" total), which is what a serving process can allocate; NVIDIA's marketing figures
("80 GB", "141 GB", "180 GB") are close to that number read in GiB, not in decimal GB.
FLOP/s are DENSE peaks: NVIDIA datasheets quote FP8/BF16 "with sparsity", twice the dense number.
Interconnect bandwidths are per GPU and per direction (NVLink datasheets quote both directions summed).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024**2
GIB = 1024**3
GB = 1000**3
TB = 1000**4
TFLOPS = 1e12


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator type: memory, HBM bandwidth, dense tensor-core peaks and interconnect."""

    name: str
    memory_bytes: int  # capacity visible to CUDA
    hbm_bandwidth: float  # bytes/s
    fp8_flops: float  # dense FLOP/s
    bf16_flops: float  # dense FLOP/s
    nvlink_bandwidth: float  # bytes/s per GPU per direction
    rdma_bandwidth: float  # bytes/s per GPU per direction (one NIC per GPU)
    nvlink_domain: int  # GPUs reachable over NVLink (one HGX node or one NVL72 rack)
    sources: tuple[str, ...]

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


H100 = GpuSpec(
    name="H100",
    memory_bytes=81559 * MIB,  # nvidia-smi on H100 SXM5 80GB: 81559MiB
    hbm_bandwidth=3.35 * TB,
    fp8_flops=1979 * TFLOPS,  # datasheet 3,958 TFLOPS with sparsity
    bf16_flops=989 * TFLOPS,  # datasheet 1,979 TFLOPS with sparsity
    nvlink_bandwidth=450 * GB,  # NVLink 4: 900 GB/s bidirectional
    rdma_bandwidth=50 * GB,  # ConnectX-7 400 Gb/s per GPU (DGX H100)
    nvlink_domain=8,
    sources=(
        "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column): 80GB, 3.35TB/s, FP8 3,958 / BF16 1,979 "
        "TFLOPS with sparsity, NVLink 900GB/s",
        "NVIDIA DGX H100 datasheet: 8x ConnectX-7 400Gb/s compute NICs",
        "nvidia-smi memory.total of an H100 SXM5 80GB: 81559 MiB",
    ),
)

H200 = GpuSpec(
    name="H200",
    memory_bytes=143771 * MIB,  # nvidia-smi on H200 SXM 141GB: 143771MiB
    hbm_bandwidth=4.8 * TB,
    fp8_flops=1979 * TFLOPS,
    bf16_flops=989 * TFLOPS,
    nvlink_bandwidth=450 * GB,
    rdma_bandwidth=50 * GB,
    nvlink_domain=8,
    sources=(
        "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column): 141GB HBM3e, 4.8TB/s, FP8 3,958 / "
        "BF16 1,979 TFLOPS with sparsity, NVLink 900GB/s",
        "NVIDIA HGX H200 reference: ConnectX-7 400Gb/s per GPU",
        "nvidia-smi memory.total of an H200 SXM: 143771 MiB",
    ),
)

B200 = GpuSpec(
    name="B200",
    memory_bytes=183359 * MIB,  # nvidia-smi on B200 (HGX/DGX B200, marketed 180GB): 183359MiB
    hbm_bandwidth=8.0 * TB,  # datasheet; the driver's bus width gives ~7.7 TB/s
    fp8_flops=4500 * TFLOPS,  # HGX B200: 72 PFLOPS FP8 with sparsity for 8 GPUs
    bf16_flops=2250 * TFLOPS,  # HGX B200: 36 PFLOPS FP16/BF16 with sparsity for 8 GPUs
    nvlink_bandwidth=900 * GB,  # NVLink 5: 1.8 TB/s bidirectional per GPU
    rdma_bandwidth=50 * GB,  # DGX B200: 8x ConnectX-7 400Gb/s
    nvlink_domain=8,
    sources=(
        "NVIDIA DGX B200 / HGX B200 datasheets: 1,440GB (8x180GB) HBM3e, 64TB/s, FP8 72 PFLOPS and "
        "FP16/BF16 36 PFLOPS with sparsity per 8 GPUs, NVLink 5 1.8TB/s per GPU, 8x ConnectX-7 400Gb/s",
        "nvidia-smi memory.total of a B200: 183359 MiB",
    ),
)

GB200 = GpuSpec(
    name="GB200",
    memory_bytes=189471 * MIB,  # nvidia-smi on GB200 (marketed 186GB): 189471MiB
    hbm_bandwidth=8.0 * TB,
    fp8_flops=5000 * TFLOPS,  # GB200 NVL72: 720 PFLOPS FP8 with sparsity for 72 GPUs
    bf16_flops=2500 * TFLOPS,  # GB200 NVL72: 360 PFLOPS FP16/BF16 with sparsity for 72 GPUs
    nvlink_bandwidth=900 * GB,
    rdma_bandwidth=50 * GB,  # ConnectX-7 400Gb/s per GPU in the compute trays
    nvlink_domain=72,
    sources=(
        "NVIDIA GB200 NVL72 datasheet: 13.4TB HBM3e (186GB per GPU), 576TB/s (8TB/s per GPU), FP8 720 "
        "and FP16/BF16 360 PFLOPS with sparsity per 72 GPUs, NVLink 130TB/s (1.8TB/s per GPU)",
        "nvidia-smi memory.total of a GB200: 189471 MiB",
    ),
)

GPUS: dict[str, GpuSpec] = {spec.name: spec for spec in (H100, H200, B200, GB200)}


def gpu_spec(name: str) -> GpuSpec:
    """Look up a GPU by name (case-insensitive); the error lists the known names."""
    spec = GPUS.get(name.upper())
    if spec is None:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return spec
