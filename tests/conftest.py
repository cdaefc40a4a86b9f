"""Shared fixtures: Ray/gloo environment, one tiny checkpoint per session.

The code under test is the installed `k2serve` package. Nothing puts the repository root on sys.path
(its folders `kernels`, `router`, ... would shadow real packages of those names); pyproject's pytest
settings add only benchmarks/, whose scripts the benchmark tests import by their file names.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A K2-format tiny checkpoint (seed 0), written once per test session."""
    from k2serve.cluster.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "k2-tiny", seed=0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (8 logical CPUs so several ranks and groups fit)."""
    from k2serve.cluster.environment import init_ray

    ray = init_ray(num_cpus=8)
    yield ray
    ray.shutdown()
