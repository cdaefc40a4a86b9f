"""Worker groups on a real local Ray with real gloo: TP attention + EP experts vs one process."""

from __future__ import annotations

import pytest
import torch

from k2serve.cluster.config import GroupSection
from k2serve.cluster.group import WorkerGroup
from k2serve.worker.config import EngineConfig
from k2serve.worker.loader import load_model
from k2serve.worker.model_runner import ModelRunner
from k2serve.worker.scheduler import StepPlan

ENGINE = EngineConfig(num_kv_blocks=64, block_size=16)


def plans() -> list[StepPlan]:
    """A 7-token prefill and a 4-token prefill together (11 tokens: not divisible by 2 or 4), then decodes."""
    a, b = [5, 77, 300, 12, 900, 1000, 4], [1, 2, 3, 640]
    return [
        StepPlan(["a", "b"], [a, b], [0, 0], [[0, 1], [2, 3]], [True, True], 16),
        StepPlan(["a", "b"], [[17], [18]], [7, 4], [[0, 1], [2, 3]], [True, True], 16),
        StepPlan(["b"], [[19]], [5], [[2, 3]], [True], 16),
        StepPlan(["a", "b"], [[20, 21, 22], [23]], [8, 6], [[0, 1], [2, 3]], [True, True], 16),
    ]


@pytest.fixture(scope="module")
def single_logits(tiny_model_dir):
    runner = ModelRunner(load_model(tiny_model_dir, progress=False), 64, 16)
    return [runner.execute(p).logits for p in plans()]


@pytest.mark.parametrize("world, dispatcher", [(4, "all_to_all"), (2, "all_gather")])
def test_group_logits_match_single_process(ray_session, tiny_model_dir, single_logits, world, dispatcher):
    config = GroupSection(name=f"g{world}{dispatcher}", tp=world, ep=world, dispatcher=dispatcher)
    group = WorkerGroup(config, str(tiny_model_dir), ENGINE).start()
    try:
        import ray

        got = ray.get(group.driver.execute_plans.remote(plans()))
        for g, want in zip(got, single_logits):
            assert torch.allclose(g, want, rtol=1e-4, atol=1e-5)
        names = ray.get([a.parameter_names.remote() for a in group.actors])
        experts = [{n.split(".mlp.experts.")[1].split(".")[0] for n in ns if ".mlp.experts." in n} for ns in names]
        assert all(len(e) == 16 // world for e in experts) and len(set.union(*experts)) == 16
    finally:
        group.stop()
