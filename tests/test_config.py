"""The cluster config: one idiom (frozen pydantic sections), every section typed, the defaults printed from them."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel

from k2serve.cluster.config import ClusterConfig, GroupSection, RouterSection, describe_defaults
from k2serve.router.config import RouterConfig
from k2serve.router.pool.admission import AdmissionConfig
from k2serve.router.pool.balancer import BalancerConfig
from k2serve.router.pool.group_pool import GroupPoolConfig
from k2serve.worker.config import EngineConfig

SECTIONS = [RouterConfig, BalancerConfig, AdmissionConfig, GroupPoolConfig, EngineConfig]


def sections(model: type[BaseModel]) -> list[type[BaseModel]]:
    """The section models of ClusterConfig (a list's item model for `groups`)."""
    out = []
    for field in model.model_fields.values():
        args = getattr(field.annotation, "__args__", None)
        out.append(args[0] if args else field.annotation)
    return out


def test_every_section_is_a_typed_frozen_model_with_described_fields():
    for section in sections(ClusterConfig) + SECTIONS:
        assert issubclass(section, BaseModel), section
        assert section.model_config.get("frozen") and section.model_config.get("extra") == "forbid", section
        assert all(f.description for f in section.model_fields.values()), section


def test_the_engine_and_router_sections_are_typed_and_reject_unknown_keys():
    config = ClusterConfig.from_yaml("engine: {max_num_seqs: 8}\n"
                                     "router: {policy: least_load, max_queue: 3, max_n: 2}\n")
    assert isinstance(config.engine, EngineConfig) and config.engine.max_num_seqs == 8
    router = config.router
    assert all(isinstance(router, cls) for cls in (RouterConfig, BalancerConfig, AdmissionConfig))
    assert (router.policy, router.max_queue, router.max_n) == ("least_load", 3, 2)
    for bad, key in (("engine: {max_num_seq: 8}", "max_num_seq"), ("router: {polcy: x}", "polcy"),
                     ("router: {max_queue: -1}", "max_queue"), ("engine: {block_size: many}", "block_size")):
        with pytest.raises(ValueError, match=key):
            ClusterConfig.from_yaml(bad)


def test_print_defaults_lists_every_key_and_loads_back_as_the_default_config():
    text = describe_defaults()
    assert ClusterConfig.model_validate(yaml.safe_load(text)) == ClusterConfig()
    for section in sections(ClusterConfig):
        for key, field in section.model_fields.items():
            assert f"{key}: " in text and f"# {field.description}" in text, (section.__name__, key)


def test_a_group_has_one_tp_equals_ep_check():
    with pytest.raises(ValueError, match="tp=2 and ep=4 must be equal"):
        GroupSection(tp=2, ep=4)
    with pytest.raises(ValueError, match="device"):
        GroupSection(device="tpu")


def test_the_router_section_is_each_of_its_configs():
    router = RouterSection(host="0.0.0.0", policy="round_robin", max_concurrency=4)
    assert RouterConfig.model_validate(router.model_dump(include=set(RouterConfig.model_fields))).host == "0.0.0.0"
    assert router.with_generation_config("/nonexistent") is router


def test_the_api_key_comes_from_the_environment_only_when_the_config_sets_none(monkeypatch):
    monkeypatch.setenv("K2SERVE_API_KEY", "from-env")
    assert RouterConfig().with_env().api_key == "from-env"
    assert RouterConfig(api_key="own").with_env().api_key == "own"
