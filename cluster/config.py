"""ClusterConfig: one validated YAML file for the whole cluster, composed from the components' configs.

    model:      {path, name}                       which checkpoint, served under which model id
    groups:     [{name, tp, ep, device, ...}]      worker groups (one model replica each)
    engine:     worker.config.EngineConfig fields (+ kv_cache_fraction on GPU)
    router:     router.config.RouterConfig fields (+ policy and the other balancer fields, + admission)
    controller: health checks, group replacement, ports
    ray:        address to join (None: start a local Ray) and local CPU slots

Every field has a default and a description (`k2serve config --print-defaults`). Environment variables
are read in cluster/environment.py only.
"""

from __future__ import annotations

from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from k2serve.router.pool.balancer import BalancerConfig
from k2serve.router.config import RouterConfig
from k2serve.worker.config import EngineConfig

BALANCER_KEYS = set(BalancerConfig.model_fields)
ENGINE_KEYS = {f.name for f in dc_fields(EngineConfig)}


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(Section):
    path: str | None = Field(None, description="Checkpoint directory (K2 format); None: the tiny model, generated on first use")
    name: str = Field("kimi-k2-instruct", description="Model id served by the APIs")


class GroupSection(Section):
    name: str = Field("group-0", description="Unique group name")
    tp: int = Field(2, ge=1, description="Tensor-parallel ranks for attention (= world size)")
    ep: int = Field(2, ge=1, description="Expert-parallel ranks for the MoE layers (must equal tp)")
    device: str = Field("cpu", description="cuda (NCCL) or cpu (gloo)")
    ranks_per_node: int = Field(8, ge=1, description="Devices per node: larger groups take whole nodes")
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPU slots per rank")
    dispatcher: str = Field("all_to_all", description="MoE dispatcher: all_to_all or all_gather (baseline)")
    collective_timeout_s: float = Field(30.0, gt=0, description="A collective that takes longer fails the group")

    @model_validator(mode="after")
    def _tp_equals_ep(self):
        if self.tp != self.ep:
            raise ValueError(f"group {self.name!r}: tp={self.tp} must equal ep={self.ep}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"group {self.name!r}: device must be cpu or cuda, got {self.device!r}")
        return self


class AdmissionSection(Section):
    max_concurrency: int = Field(256, ge=1, description="Requests the router forwards at once")
    max_queue: int = Field(1024, ge=0, description="Requests waiting for a slot; beyond it: 429")


class ControllerSection(Section):
    health_interval_s: float = Field(1.0, gt=0, description="Seconds between group health checks")
    replace_dead_groups: bool = Field(True, description="Start a new group in place of a dead one")
    discovery_port: int = Field(8001, ge=0, le=65535, description="HTTP port publishing live groups (GET /v1/groups)")
    worker_grpc_host: str = Field("127.0.0.1", description="Rank 0's gRPC bind address (0.0.0.0 on a real cluster; routers get the node IP)")
    worker_grpc_port: int = Field(0, ge=0, le=65535, description="Rank 0's gRPC port (0: a free port; 50051 in k8s)")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="Rank 0's Prometheus port (0: a free port; 9400 in k8s)")
    drain_timeout_s: float = Field(10.0, ge=0, description="On shutdown, wait this long for in-flight requests")


class RaySection(Section):
    address: str | None = Field(None, description="Ray cluster to join ('auto' or host:port); None starts a local one")
    num_cpus: int = Field(8, ge=1, description="CPU slots of a local Ray (logical; ranks take cpus_per_rank each)")


class ClusterConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection, description="Checkpoint")
    groups: list[GroupSection] = Field(default_factory=lambda: [GroupSection()], description="Worker groups")
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig fields, plus kv_cache_fraction")
    router: dict[str, Any] = Field(default_factory=dict, description="RouterConfig fields, balancer fields, admission")
    controller: ControllerSection = Field(default_factory=ControllerSection, description="Supervision and ports")
    ray: RaySection = Field(default_factory=RaySection, description="Ray cluster")

    @field_validator("groups")
    @classmethod
    def _unique_names(cls, groups):
        names = [g.name for g in groups]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"group names must be unique and at least one group is needed, got {names}")
        return groups

    @model_validator(mode="after")
    def _sections_build(self):
        self.engine_config(), self.router_config(), self.balancer_config(), self.admission()
        return self

    def engine_config(self) -> EngineConfig:
        unknown = set(self.engine) - ENGINE_KEYS - {"kv_cache_fraction"}
        if unknown:
            raise ValueError(f"unknown engine keys {sorted(unknown)}; known: {sorted(ENGINE_KEYS)}")
        return EngineConfig(**{k: v for k, v in self.engine.items() if k in ENGINE_KEYS})

    @property
    def kv_cache_fraction(self) -> float | None:
        return self.engine.get("kv_cache_fraction")

    def router_config(self) -> RouterConfig:
        keys = set(RouterConfig.model_fields)
        unknown = set(self.router) - keys - BALANCER_KEYS - set(AdmissionSection.model_fields)
        if unknown:
            raise ValueError(f"unknown router keys {sorted(unknown)}")
        return RouterConfig.from_env(**{k: v for k, v in self.router.items() if k in keys})

    def balancer_config(self) -> BalancerConfig:
        return BalancerConfig(**{k: v for k, v in self.router.items() if k in BALANCER_KEYS})

    def admission(self) -> AdmissionSection:
        return AdmissionSection(**{k: v for k, v in self.router.items() if k in AdmissionSection.model_fields})

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
    """The default config as YAML, every field followed by its description as a comment."""
    lines = ["# k2serve cluster config: defaults (each key documented)"]
    for section, model in (("model", ModelSection), ("controller", ControllerSection), ("ray", RaySection)):
        lines.append(f"{section}:")
        lines += [f"  {k}: {yaml_value(f.default)}  # {f.description}" for k, f in model.model_fields.items()]
    lines.append("groups:")
    first = True
    for k, f in GroupSection.model_fields.items():
        lines.append(f"  {'- ' if first else '  '}{k}: {yaml_value(f.default)}  # {f.description}")
        first = False
    lines.append("engine:")
    lines += [f"  {f.name}: {yaml_value(f.default)}  # {f.metadata.get('description', '')}" for f in dc_fields(EngineConfig)]
    lines.append("  kv_cache_fraction: null  # GPU: fraction of free memory after weights for the KV cache")
    lines.append("router:")
    lines += [f"  {k}: {yaml_value(f.default)}  # {f.description}" for k, f in RouterConfig.model_fields.items()]
    lines += [f"  {k}: {yaml_value(f.default)}  # {f.description}" for k, f in BalancerConfig.model_fields.items()]
    lines += [f"  {k}: {yaml_value(f.default)}  # {f.description}" for k, f in AdmissionSection.model_fields.items()]
    return "\n".join(lines) + "\n"


def yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
