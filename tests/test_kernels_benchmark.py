"""benchmarks/gpu_kernels.py: argument parsing, the no-CUDA message, and a CPU smoke run of the whole script."""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

import gpu_kernels  # noqa: E402


def test_help_and_dry_run(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_kernels.main(["--help"])
    assert exc.value.code == 0
    assert gpu_kernels.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fused_moe T=4096" in out and "fp8_gemm+fp8_linear gate_up N=4096 K=7168 T=1" in out
    assert "mla_decode H=8 block=64 bf16 B=256 ctx=32768" in out and "mla_prefill H=8 L=8192 ctx=32768" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_without_cuda_it_says_so_and_fails(capsys):
    assert gpu_kernels.main([]) == 1
    assert "CUDA is required" in capsys.readouterr().out


def test_cpu_smoke_run_checks_times_and_appends(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# previous runs\n")
    assert gpu_kernels.main(["--cpu-smoke", "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# previous runs\n") and "CPU (Triton interpreter smoke run)" in text
    for name in ("fp8_quant", "fp8_gemm", "fused_moe", "mla_decode", "mla_prefill"):
        assert f"correctness {name}: ok" in text
    for kernel in ("| fp8_quant |", "| fp8_gemm |", "| fp8_linear |", "| fused_moe |", "| mla_decode |",
                   "| mla_prefill |"):
        assert kernel in text


def test_rows_of_kernels_that_failed_their_check_are_marked():
    rows = [gpu_kernels.Row(k, "s", 1, 1.0, 2.0, 1e9, 1e6) for k in ("fp8_quant", "fp8_gemm", "fp8_linear", "fused_moe")]
    checks = [gpu_kernels.Check("fp8_quant", True, ""), gpu_kernels.Check("fp8_gemm", False, "boom"),
              gpu_kernels.Check("fused_moe", True, "")]
    marked = [r.kernel for r in gpu_kernels._mark_failed(rows, checks)]
    assert marked == ["fp8_quant", "fp8_gemm (check FAILED)", "fp8_linear (check FAILED)", "fused_moe"]
    table = gpu_kernels.format_table(rows[:1], gpu_kernels.Ceilings(1000.0, 100.0, None))
    assert "| fp8_quant | s | 1 | 1.0000 | 2.0000 | 2.00x | 1.0 | 1% | 1 | 0% |" in table  # 1 TFLOP/s, 1 GB/s
