"""Ray placement for a worker group, as data: a pure function tests call without Ray.

One GPU per rank. Ranks are packed onto as few nodes as possible: a group that fits on one node
gets one bundle on one node (STRICT_PACK); a larger group takes whole nodes, one bundle per node
(STRICT_SPREAD), e.g. 16 ranks as two 8-GPU bundles on two H200 nodes. On CPU a rank takes CPU slots.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupPlacement:
    bundles: list[dict[str, float]]  # one per node the group occupies
    strategy: str  # Ray placement strategy
    ranks_per_bundle: int

    def bundle_of(self, rank: int) -> int:
        return rank // self.ranks_per_bundle

    def rank_resources(self, device: str, cpus_per_rank: float) -> dict[str, float]:
        """Resources each rank's actor asks for inside its bundle."""
        return {"num_gpus": 1, "num_cpus": cpus_per_rank} if device == "cuda" else {"num_gpus": 0, "num_cpus": cpus_per_rank}


def placement_bundles(world_size: int, device: str, ranks_per_node: int = 8, cpus_per_rank: float = 1) -> GroupPlacement:
    """Bundles and strategy for a group of `world_size` ranks on nodes holding `ranks_per_node` devices."""
    if world_size < 1 or ranks_per_node < 1:
        raise ValueError(f"world_size ({world_size}) and ranks_per_node ({ranks_per_node}) must be >= 1")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if world_size <= ranks_per_node:
        per_node, n_nodes, strategy = world_size, 1, "STRICT_PACK"
    elif world_size % ranks_per_node:
        raise ValueError(
            f"a {world_size}-rank group spans several nodes and must fill whole {ranks_per_node}-rank nodes"
        )
    else:
        per_node, n_nodes, strategy = ranks_per_node, world_size // ranks_per_node, "STRICT_SPREAD"
    bundle = {"CPU": per_node * cpus_per_rank}
    if device == "cuda":
        bundle["GPU"] = per_node
    return GroupPlacement([dict(bundle) for _ in range(n_nodes)], strategy, per_node)
