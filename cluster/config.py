"""ClusterConfig: one validated YAML file for the whole cluster, composed from the components' configs.

    model:      ModelSection        which checkpoint, served under which model id
    groups:     [GroupSection]      worker groups (one model replica each)
    engine:     EngineConfig        the engine of every group (worker/config.py)
    router:     RouterSection       the router's settings, its balancer's and its admission limits
    controller: ControllerSection   health checks, group replacement, ports
    security:   SecuritySection     TLS and client authentication of the workers' and the controller's ports
    ray:        RaySection          address to join (None: start a local Ray) and local CPU slots

Every section is a frozen pydantic model that rejects unknown keys; every field has a default and a
description, and `describe_defaults` (`k2serve config --print-defaults`) prints them all from the models.
Environment variables are read in cluster/environment.py and, for the router's API key, router/config.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from k2serve.router.config import RouterConfig
from k2serve.router.pool.admission import AdmissionConfig
from k2serve.router.pool.balancer import BalancerConfig
from k2serve.router.pool.migration import MigrationConfig
from k2serve.worker.config import EngineConfig


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(Section):
    path: str | None = Field(
        None, description="Checkpoint directory (K2 format); None: the tiny model, generated on first use")
    name: str = Field("kimi-k2-instruct", description="Model id served by the APIs")


class GroupSection(Section):
    """One worker group: a model replica over tp ranks (attention tp = expert ep = world size)."""

    name: str = Field("group-0", description="Unique group name")
    tp: int = Field(2, ge=1, description="Tensor-parallel ranks for attention (= world size)")
    ep: int = Field(2, ge=1, description="Expert-parallel ranks for the MoE layers (must equal tp)")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda (NCCL) or cpu (gloo)")
    ranks_per_node: int = Field(8, ge=1, description="Devices per node: larger groups take whole nodes")
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPU slots per rank")
    dispatcher: Literal["all_to_all", "all_gather"] = Field(
        "all_to_all", description="MoE dispatcher: all_to_all or all_gather (baseline)")
    collective_timeout_s: float = Field(30.0, gt=0, description="A collective that takes longer fails the group")
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="An idle group runs a no-op step through every rank (one all-reduce) this often")
    hang_timeout_s: float = Field(
        30.0, gt=0, description="A step or heartbeat running longer means a rank hangs: the group reports "
        "NOT_SERVING, ends its streams with 503 (routers resume them elsewhere) and the controller replaces it; "
        "allow for the first step's kernel compilation on GPU")

    @model_validator(mode="after")
    def _tp_equals_ep(self) -> "GroupSection":
        if self.tp != self.ep:
            raise ValueError(f"group {self.name!r}: tp={self.tp} and ep={self.ep} must be equal (every rank holds "
                             f"heads and experts; data-parallel attention is not supported yet)")
        return self

    @property
    def world_size(self) -> int:
        return self.tp


class RouterSection(AdmissionConfig, BalancerConfig, MigrationConfig, RouterConfig):
    """The `router` section: the fields of RouterConfig, MigrationConfig, BalancerConfig and AdmissionConfig
    in one mapping.

    It is each of the four (their fields and checks), so it is passed wherever one of them is expected.
    """


class ControllerSection(Section):
    health_interval_s: float = Field(1.0, gt=0, description="Seconds between group health checks")
    replace_dead_groups: bool = Field(True, description="Start a new group in place of a dead one")
    discovery_port: int = Field(8001, ge=0, le=65535, description="HTTP port publishing live groups (GET /v1/groups)")
    worker_grpc_host: str = Field(
        "127.0.0.1", description="Rank 0's gRPC bind address (0.0.0.0 on a real cluster; routers get the node IP)")
    worker_grpc_port: int = Field(
        0, ge=0, le=65535, description="Rank 0's gRPC port (0: a free port; 50051 in k8s)")
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Rank 0's Prometheus port (0: a free port; 9400 in k8s)")
    drain_timeout_s: float = Field(
        10.0, ge=0, description="On shutdown, SIGTERM or a rolling restart, wait this long for in-flight requests "
        "(those left then end with a 503 that routers resume elsewhere)")
    restart_pause_s: float = Field(
        5.0, ge=0, description="A rolling restart waits this long after a group serves again before draining the "
        "next, so that every router has found the new incarnation (routers poll discovery every health_interval_s)")
    worker_pid_dir: str | None = Field(
        None, description="Rank 0 of each group writes its pid here while serving, for `k2serve drain` "
        "(a Kubernetes preStop hook); None: no pid files")


class SecuritySection(Section):
    """Who may use the workers' gRPC port and the controller's discovery port (cluster/security.py)."""

    tls: bool = Field(False, description="Workers' gRPC and the discovery port speak TLS and take only routers "
                      "and k2serve commands that authenticate (client_auth); off: plaintext for anyone who "
                      "reaches them")
    client_auth: Literal["token", "mtls"] = Field(
        "token", description="token: clients send the shared secret in token_file; mtls: clients present "
        "cert_file, which ca_file must have signed")
    ca_file: str | None = Field(None, description="PEM CA that signed cert_file (clients verify servers with it; "
                                "with mtls servers verify clients)")
    cert_file: str | None = Field(None, description="PEM certificate every k2serve process presents (workers and "
                                  "the controller as servers; routers too with mtls), e.g. from a mounted Secret")
    key_file: str | None = Field(None, description="PEM private key of cert_file")
    token_file: str | None = Field(None, description="File holding the shared secret (client_auth token)")
    server_name: str = Field("k2serve", description="DNS name in cert_file that clients verify, instead of the "
                             "address they dial (worker addresses are pod IPs)")

    @model_validator(mode="after")
    def _files_for_tls(self) -> "SecuritySection":
        needed = ["ca_file", "cert_file", "key_file"] + (["token_file"] if self.client_auth == "token" else [])
        missing = [name for name in needed if self.tls and not getattr(self, name)]
        if missing:
            raise ValueError(f"security.tls with client_auth {self.client_auth} needs {', '.join(missing)}")
        return self


class RaySection(Section):
    address: str | None = Field(None, description="Ray cluster to join ('auto' or host:port); None starts a local one")
    num_cpus: int = Field(8, ge=1, description="CPU slots of a local Ray (logical; ranks take cpus_per_rank each)")


class ClusterConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection, description="Checkpoint")
    groups: list[GroupSection] = Field(default_factory=lambda: [GroupSection()], description="Worker groups")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The engine of every group")
    router: RouterSection = Field(default_factory=RouterSection, description="Router, balancer and admission")
    controller: ControllerSection = Field(default_factory=ControllerSection, description="Supervision and ports")
    security: SecuritySection = Field(default_factory=SecuritySection, description="TLS and client authentication")
    ray: RaySection = Field(default_factory=RaySection, description="Ray cluster")

    @field_validator("groups")
    @classmethod
    def _unique_names(cls, groups: list[GroupSection]) -> list[GroupSection]:
        names = [g.name for g in groups]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"group names must be unique and at least one group is needed, got {names}")
        return groups

    @classmethod
    def from_yaml(cls, text: str) -> "ClusterConfig":
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError("the cluster config must be a YAML mapping")
        return cls.model_validate(data)

    @classmethod
    def from_file(cls, path: str | Path) -> "ClusterConfig":
        return cls.from_yaml(Path(path).read_text())


def describe_defaults() -> str:
    """The default config as YAML, every key followed by its description as a comment."""
    lines = ["# k2serve cluster config: defaults (each key documented)"]
    for name, field in ClusterConfig.model_fields.items():
        lines.append(f"{name}:  # {field.description}")
        section, listed = _section_type(field.annotation)
        for i, (key, line) in enumerate(_field_lines(section)):
            lines.append(("  - " if listed and i == 0 else "    " if listed else "  ") + f"{key}: {line}")
    return "\n".join(lines) + "\n"


def _section_type(annotation: Any) -> tuple[type[BaseModel], bool]:
    """(the section's model, whether the section is a list of them)."""
    args = getattr(annotation, "__args__", None)
    return (args[0], True) if args else (annotation, False)


def _field_lines(section: type[BaseModel]) -> list[tuple[str, str]]:
    return [(key, f"{yaml_value(f.get_default(call_default_factory=True))}  # {f.description}")
            for key, f in section.model_fields.items()]


def yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
