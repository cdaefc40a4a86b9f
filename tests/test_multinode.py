"""A worker group spanning two Ray nodes (a multi-node Ray cluster started on this machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from k2serve.cluster.placement import placement_bundles
from k2serve.worker.config import EngineConfig
from k2serve.worker.engine import Engine
from k2serve.worker.request import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 77, 300, 12, 900], [1, 2, 3]]


def test_placement_is_pure_data():
    one_node = placement_bundles(8, "cuda")
    assert one_node.strategy == "STRICT_PACK" and one_node.bundles == [{"CPU": 8, "GPU": 8}]
    two_nodes = placement_bundles(16, "cuda", ranks_per_node=8)
    assert two_nodes.strategy == "STRICT_SPREAD" and two_nodes.bundles == [{"CPU": 8, "GPU": 8}] * 2
    assert [two_nodes.bundle_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert placement_bundles(2, "cpu").bundles == [{"CPU": 2}]


def test_group_across_two_ray_nodes_gives_the_same_tokens(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_group.py"), str(tiny_model_dir), json.dumps(PROMPTS), "10"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(result["nodes"])) == 2, "the two ranks must sit on different Ray nodes"
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = Engine.from_model_dir(tiny_model_dir, EngineConfig(num_kv_blocks=32, block_size=16)).generate(PROMPTS, params)
    assert result["tokens"] == want
