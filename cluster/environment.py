"""The one place that reads environment variables and sets the process environment for Ray."""

from __future__ import annotations

import os
from pathlib import Path

# Ray binds to the external interface by default; keep it on loopback for the local default.
RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def apply_local_ray_env() -> None:
    for key, value in RAY_LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def ray_init_kwargs(num_cpus: int | None = None, address: str | None = None) -> dict:
    """Arguments for ray.init: a quiet local cluster (or `address` to join one) whose workers import the installed k2serve."""
    apply_local_ray_env()
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                  runtime_env={"env_vars": dict(RAY_LOCAL_ENV)})
    if address:
        kwargs["address"] = address
    else:  # a local cluster stays on loopback
        kwargs.update(num_cpus=num_cpus, _node_ip_address="127.0.0.1")
    return kwargs


def default_home() -> Path:
    """Where `k2serve serve` keeps the generated tiny checkpoint (K2SERVE_HOME, default ~/.cache/k2serve)."""
    return Path(os.environ.get("K2SERVE_HOME", Path.home() / ".cache" / "k2serve"))
