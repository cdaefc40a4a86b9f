"""The one place that reads environment variables and sets the process environment for Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Ray binds to the machine's external interface by default; these keep a local cluster on loopback.
# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported: with it unset (or 1) a local node takes
# the external address whatever ray.init's _node_ip_address says, and its GCS and raylet listen on every
# interface. So it must be set before `import ray`: `init_ray` does so, and refuses to start a local
# cluster in a process that imported ray too early.
RAY_LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
LOOPBACK = "127.0.0.1"


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
        kwargs.update(num_cpus=num_cpus, _node_ip_address=LOOPBACK)
    return kwargs


def init_ray(num_cpus: int | None = None, address: str | None = None):
    """ray.init for `k2serve`'s commands: join `address`, or start a local Ray that listens on loopback only.

    Call it before anything imports ray (the k2serve modules import it lazily). Returns the ray module.
    """
    if not address:
        constants = sys.modules.get("ray._private.ray_constants")  # what an earlier `import ray` read
        if getattr(constants, "ENABLE_RAY_CLUSTER", False):
            raise RuntimeError("ray was imported before the local cluster's environment was set: it would listen "
                               "on every interface; call k2serve.cluster.environment.init_ray before importing ray")
        apply_local_ray_env()
    import ray

    ray.init(**ray_init_kwargs(num_cpus, address))
    return ray


def default_home() -> Path:
    """Where `k2serve serve` keeps the generated tiny checkpoint (K2SERVE_HOME, default ~/.cache/k2serve)."""
    return Path(os.environ.get("K2SERVE_HOME", Path.home() / ".cache" / "k2serve"))
