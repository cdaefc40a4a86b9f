"""Compile every Triton kernel (FP8 and MLA attention) for Hopper (sm_90) ahead of time, without a GPU.

The interpreter tests check the kernels' math; this checks what only the compiler sees: fp8 `tl.dot`
lowering, constexpr plumbing, shared-memory fit, and that the K loop is software-pipelined
(`cp.async` copies appear once sizes and pointers carry the 16-divisibility that K2's shapes give
the launcher). Run: `python -m k2serve.kernels.compile_check [--quick] [--arch 90]`; TRITON_INTERPRET must be
unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from k2serve.kernels import fp8_gemm, fp8_quant, fused_moe, mla_decode
from k2serve.kernels.triton_cast import is_interpreter

# Integer arguments that vary per call (or need not be multiples of 16) and so carry no divisibility hint.
UNHINTED = {"M", "M_BUCKET", "num_pairs", "num_heads", "num_splits", "stride_bt", "stride_lb", "stride_lh"}


@dataclass(frozen=True)
class KernelBuild:
    """One kernel specialization to compile."""

    label: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class BuildResult:
    label: str
    ok: bool
    detail: str


def _gemm_builds(quick: bool) -> list[KernelBuild]:
    sig = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "c_ptr": "*bf16",
           **{n: "i32" for n in ("M", "N", "K", "M_BUCKET", "stride_am", "stride_asm", "stride_wn", "stride_wsn",
                                 "stride_cm")}}
    configs = [fp8_gemm.GPU_CONFIGS[1], fp8_gemm.GPU_CONFIGS[10]] if quick else fp8_gemm.GPU_CONFIGS
    return [KernelBuild(f"fp8_gemm BM={c.kwargs['BLOCK_M']} BN={c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}",
                        fp8_gemm._w8a8_block_gemm_kernel, sig,
                        {"GROUP_N": 128, "BLOCK_K": 128, "INTERPRET": False, **c.kwargs}, c.num_warps, c.num_stages)
            for c in configs]


def _moe_builds(quick: bool) -> list[KernelBuild]:
    sig = {"a_ptr": "*fp8e4nv", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "c_ptr": "*bf16",
           "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32", "topk_w_ptr": "*fp32",
           **{n: "i32" for n in ("num_pairs", "N", "K", "SPLIT_N", "N_FIRST_SROWS", "stride_am", "stride_asm",
                                 "stride_we", "stride_wn", "stride_wse", "stride_wsn", "stride_cm")}}
    configs = [fused_moe.MoeKernelConfig(16, 64, 4, 4)]
    if not quick:
        configs += [fused_moe.MoeKernelConfig(32, 128, 4, 3), fused_moe.MoeKernelConfig(64, 128, 4, 3)]
    builds = [KernelBuild(f"fused_moe gemm{2 if second else 1} BM={c.block_m} BN={c.block_n}", fused_moe._moe_gemm_kernel,
                          sig, {"TOP_K": 8, "GROUP_N": 128, "BLOCK_K": 128, "A_BY_POSITION": second,
                                "C_BY_PAIR": second, "MUL_WEIGHT": second, "INTERPRET": False,
                                "BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, c.num_warps, c.num_stages)
              for c in configs for second in (False, True)]
    act_sig = {"h_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "num_padded_ptr": "*i32",
               **{n: "i32" for n in ("INTER", "stride_hm", "stride_qm", "stride_sm")}}
    return builds + [KernelBuild("fused_moe silu_mul_quant", fused_moe._silu_mul_quant_kernel, act_sig,
                                 {"GROUP": 128, "BLOCK_M": 8, "EPS": 1e-10, "FMAX": 448.0, "INTERPRET": False})]


def _quant_builds() -> list[KernelBuild]:
    sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
           **{n: "i32" for n in ("M", "K", "stride_xm", "stride_qm", "stride_sm")}}
    return [KernelBuild("fp8_quant", fp8_quant._per_token_group_quant_kernel, sig,
                        {"GROUP": 128, "BLOCK_M": 8, "EPS": 1e-10, "FMAX": 448.0, "INTERPRET": False})]


def _mla_decode_builds() -> list[KernelBuild]:
    """K2's widths (512 + 64), block size 64, a bf16 and an FP8 cache; the merge kernel."""
    dims = {"LATENT_DIM": 512, "BLOCK_DL": 512, "BLOCK_N": mla_decode.GPU_LAUNCH["BLOCK_N"]}
    launch = {"num_warps": mla_decode.GPU_LAUNCH["num_warps"], "num_stages": mla_decode.GPU_LAUNCH["num_stages"]}
    builds = []
    for cache in ("bf16", "fp8e4nv"):
        sig = {"q_lat_ptr": "*bf16", "q_pe_ptr": "*bf16", "cache_ptr": f"*{cache}", "block_tables_ptr": "*i32",
               "seq_lens_ptr": "*i32", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "qk_scale": "fp32",
               "kv_scale": "fp32", **{n: "i32" for n in (
                   "num_heads", "num_splits", "stride_qlb", "stride_qlh", "stride_qpb", "stride_qph",
                   "stride_cache_block", "stride_cache_token", "stride_bt", "stride_ob", "stride_oh", "stride_os",
                   "stride_lb", "stride_lh")}}
        constexprs = {**dims, "ROPE_DIM": 64, "BLOCK_DR": 64, "PAGE_SIZE": 64, "BLOCK_H": mla_decode.BLOCK_H,
                      "COMPUTE": triton.language.bfloat16, "IS_FP8": cache == "fp8e4nv", "PRECISION": "tf32"}
        builds.append(KernelBuild(f"mla_decode split {cache} cache", mla_decode._mla_decode_split_kernel, sig,
                                  constexprs, **launch))
    merge_sig = {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "seq_lens_ptr": "*i32", "out_ptr": "*bf16",
                 **{n: "i32" for n in ("num_splits", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh",
                                       "stride_outb", "stride_outh")}}
    return builds + [KernelBuild("mla_decode merge", mla_decode._mla_decode_merge_kernel, merge_sig,
                                 {**dims, "INTERPRET": False})]


def all_builds(quick: bool = False) -> list[KernelBuild]:
    return _quant_builds() + _gemm_builds(quick) + _moe_builds(quick) + _mla_decode_builds()


def compile_build(build: KernelBuild, arch: int = 90) -> BuildResult:
    """Compile one specialization to a cubin; GEMMs must come out software-pipelined (cp.async in the PTX)."""
    signature = {**build.signature, **{k: "constexpr" for k in build.constexprs}}
    hinted = [n for n, t in build.signature.items() if t.startswith("*") or (t == "i32" and n not in UNHINTED)]
    attrs = {(build.kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    src = ASTSource(fn=build.kernel, signature=signature, constexprs=build.constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": build.num_warps, "num_stages": build.num_stages})
    except Exception as exc:  # report every failing build, not just the first
        return BuildResult(build.label, False, f"{type(exc).__name__}: {exc}")
    ptx = compiled.asm["ptx"]
    pipelined = "cp.async" in ptx or "cp.async.bulk" in ptx
    if "gemm" in build.label and build.num_stages > 1 and not pipelined:
        return BuildResult(build.label, False, "the K loop was not software-pipelined (no cp.async)")
    return BuildResult(build.label, True, f"shared memory {compiled.metadata.shared} B")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compile the Triton kernels for a CUDA arch without a GPU.")
    p.add_argument("--quick", action="store_true", help="one decode and one prefill config per kernel")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if is_interpreter():
        print("compile_check: TRITON_INTERPRET is set, so the kernels are interpreted; unset it to compile")
        return 2
    results = [compile_build(b, args.arch) for b in all_builds(args.quick)]
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.label}: {r.detail}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
