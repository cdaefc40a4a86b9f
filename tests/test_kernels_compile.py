"""Every Triton kernel (FP8 and MLA decode) compiles for Hopper (sm_90), GEMMs with a pipelined K loop; no GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed; the FP8 kernels need it")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists() and "TRITON_PTXAS_PATH" not in os.environ,
                    reason="this triton build ships no ptxas, so nothing can be compiled for CUDA here")
def test_kernels_compile_for_sm90(tmp_path):
    # A separate process: the other kernel tests set TRITON_INTERPRET, and interpreted kernels cannot compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "k2serve.kernels.compile_check", "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == 9, proc.stdout
