"""benchmarks/gpu_smoke.py: the no-CUDA message, a phase that overruns its budget, and the whole CPU smoke run
(kernels under the Triton interpreter, the tiny model against CPU float32, the slice at three batch sizes)."""

from __future__ import annotations

import os

import pytest
import torch

# Importing triton reads TRITON_INTERPRET: set it first, as every kernel test module does (a test module
# collected earlier than the kernel tests would otherwise fix triton in compiled mode for the session).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")

import gpu_smoke  # noqa: E402


def test_help_and_the_no_cuda_message(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_smoke.main(["--help"])
    assert exc.value.code == 0
    if not torch.cuda.is_available():
        assert gpu_smoke.main([]) == 1
        assert "CUDA is required" in capsys.readouterr().out


def test_a_phase_over_budget_is_killed_and_reported(tmp_path):
    late = gpu_smoke.launch("tiny", smoke=True, budget_s=1.0, workdir=tmp_path)
    assert late.status == "timed out after 1s" and not late.ok
    assert "### tiny: FAILED (timed out after 1s" in gpu_smoke.format_phase(late)


def test_cpu_smoke_runs_every_phase_and_appends(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# previous runs\n")
    assert gpu_smoke.main(["--cpu-smoke", "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# previous runs\n") and "gpu_smoke on CPU (smoke run, Triton interpreter)" in text
    for phase in ("kernels", "tiny", "slice"):
        assert f"### {phase}: ok (ok," in text, phase
    assert "check ok: kernels match their torch references" in text and "| fused_moe |" in text
    assert "greedy tokens equal the CPU float32 run (identical)" in text
    assert "within the FP8 tolerance of CPU float32" in text
    assert "check ok: FP8 (e4m3) latent cache (torch.float8_e4m3fn) within its tolerance" in text
    assert "correctness mla_decode: ok" in text and "| mla_decode |" in text
    assert "KV cache 58,240 tokens" in text  # 64 MiB / (2 layers x 64 tokens x (128 + 16) x 4 bytes) = 910 blocks
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 4 |", "| 8 |"))]
    assert len(rows) == 3
