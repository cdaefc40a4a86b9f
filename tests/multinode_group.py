"""Run by tests/test_multinode.py in its own process: a two-node Ray cluster on this machine, one group across it.

Prints one JSON line: the node id of each rank and the greedy tokens the group generated.
"""

import json
import sys

import ray
from ray.cluster_utils import Cluster

from k2serve.cluster.environment import RAY_LOCAL_ENV, apply_local_ray_env
from k2serve.cluster.config import GroupSection
from k2serve.cluster.group import WorkerGroup
from k2serve.worker.config import EngineConfig
from k2serve.worker.request import SamplingParams


def main(model_dir: str, prompts: list[list[int]], max_tokens: int) -> None:
    apply_local_ray_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": dict(RAY_LOCAL_ENV)})
    config = GroupSection(name="two-nodes", tp=2, ep=2, ranks_per_node=1)
    group = WorkerGroup(config, model_dir, EngineConfig(num_kv_blocks=32, block_size=16)).start()
    try:
        nodes = ray.get([a.node_id.remote() for a in group.actors])
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        tokens = ray.get(group.driver.generate.remote(prompts, params))
    finally:
        group.stop()
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps({"nodes": nodes, "tokens": tokens, "cluster_nodes": 2}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
