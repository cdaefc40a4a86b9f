"""WorkerGroup: start, watch and stop one model replica spread over the ranks of a Ray placement group.

Start: a placement group (cluster/placement.py), one RankActor per rank, rendezvous at rank 0's
address on a free port, torch.distributed (NCCL on GPU, gloo on CPU) plus a gloo control group,
every rank loads its shard, ranks > 0 enter their follow loop, rank 0 builds the engine.
Health (`health()`): failed when a rank died, a follower's loop ended, a rank does not answer in time,
or rank 0's engine failed (a step or heartbeat through every rank hung or broke); draining while
rank 0 finishes its requests before stopping; serving otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k2serve.cluster.config import GroupSection
from k2serve.cluster.placement import placement_bundles
from k2serve.cluster.rank_actor import RankActor, ServeSpec
from k2serve.worker.config import EngineConfig
from k2serve.worker.health import FAILED, SERVING
from k2serve.worker.rank_worker import RankSpec

log = logging.getLogger(__name__)


def _pid(actor) -> int:
    return os.getpid()


@dataclass(frozen=True)
class GroupHealth:
    """state: "serving", "draining" or "failed" (worker/health.py's states); `reason` says why."""

    state: str
    reason: str = ""


class WorkerGroup:
    """The group `config` describes, serving the checkpoint in `model_dir` with `engine`'s settings."""

    def __init__(self, config: GroupSection, model_dir: str, engine: EngineConfig = EngineConfig(),
                 start_timeout_s: float = 300.0):
        self.config = config
        self.model_dir = model_dir
        self.engine = engine
        self.start_timeout_s = start_timeout_s
        self.actors: list = []
        self.follower_refs: list = []
        self.pg = None
        self.grpc_port: int | None = None
        self.grpc_host: str | None = None
        self.metrics_port: int | None = None  # rank 0's Prometheus port, when serving metrics
        self.pids: list[int] = []  # each rank's process id (operators and failover tests)

    def start(self) -> "WorkerGroup":
        """Place, start and connect every rank; rank 0 ends up holding the engine."""
        group, timeout, t0 = self.config, self.start_timeout_s, time.monotonic()
        placement = placement_bundles(group.world_size, group.device, group.ranks_per_node, group.cpus_per_rank)
        self.pg = placement_group(placement.bundles, strategy=placement.strategy, name=f"k2serve-{group.name}")
        ray.get(self.pg.ready(), timeout=timeout)
        self.actors = [self._make_actor(r, placement) for r in range(group.world_size)]
        master = ray.get(self.actors[0].node_ip.remote())
        port = ray.get(self.actors[0].free_port.remote())
        ray.get([a.join.remote(master, port) for a in self.actors], timeout=timeout)
        ray.get([a.load.remote() for a in self.actors], timeout=timeout)
        self.follower_refs = [a.follow.remote() for a in self.actors[1:]]
        ray.get(self.driver.build_engine.remote())
        self.pids = ray.get([a.__ray_call__.remote(_pid) for a in self.actors])
        log.info("group %s: %d ranks up in %.1fs", group.name, group.world_size, time.monotonic() - t0)
        return self

    def rank_spec(self, rank: int) -> RankSpec:
        """What rank `rank` of this group is told."""
        group = self.config
        return RankSpec(rank, group.world_size, self.model_dir, self.engine, group.device,
                        group.collective_timeout_s, group.dispatcher, group.heartbeat_interval_s, group.hang_timeout_s)

    def _make_actor(self, rank: int, placement):
        group = self.config
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=placement.bundle_of(rank))
        actor_cls = ray.remote(RankActor).options(
            scheduling_strategy=strategy, max_concurrency=4, name=None,
            **placement.rank_resources(group.device, group.cpus_per_rank),
        )
        return actor_cls.remote(self.rank_spec(rank))

    @property
    def driver(self):
        return self.actors[0]

    def serve(self, spec: ServeSpec = ServeSpec()) -> str:
        """Start rank 0's gRPC server (and, with `spec.metrics_port`, 0 = free, its Prometheus endpoint on
        the same host); returns the gRPC address host:port."""
        spec = replace(spec, group=self.config.name)
        self.grpc_host = ray.get(self.driver.node_ip.remote()) if spec.host == "0.0.0.0" else spec.host
        self.grpc_port = ray.get(self.driver.serve.remote(spec))
        if spec.metrics_port is not None:
            self.metrics_port = ray.get(self.driver.metrics_port.remote())
        return self.address

    @property
    def metrics_address(self) -> str | None:
        """host:port of rank 0's Prometheus endpoint (GET /metrics), or None."""
        return f"{self.grpc_host}:{self.metrics_port}" if self.metrics_port is not None else None

    @property
    def address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    def health(self, timeout_s: float = 2.0) -> GroupHealth:
        """The group's health now (see the module docstring); a rank that does not answer within
        `timeout_s` (stopped, or its process hung) fails it."""
        if not self.actors:
            return GroupHealth(FAILED, "not started")
        if self.follower_refs and ray.wait(self.follower_refs, timeout=0, num_returns=len(self.follower_refs))[0]:
            return GroupHealth(FAILED, "a follower rank stopped following rank 0")
        try:
            states = ray.get([a.health.remote() for a in self.actors], timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - dead or unresponsive rank
            return GroupHealth(FAILED, f"a rank did not answer: {type(exc).__name__}")
        failing = next((state for state in states if state[0] != SERVING), None)  # rank 0's first
        return GroupHealth(*failing) if failing is not None else GroupHealth(SERVING)

    def is_healthy(self, timeout_s: float = 2.0) -> bool:
        """True while the group can take requests (see `health`)."""
        return self.health(timeout_s).state == SERVING

    def drain(self, grace_s: float) -> int:
        """Stop serving gracefully: new requests refused, those in flight given `grace_s`, the rest ended
        with a 503 (routers resume them elsewhere). Returns how many were ended. The ranks stay up."""
        return ray.get(self.driver.drain.remote(grace_s), timeout=grace_s + 30)

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Drain for at most `grace_s` and release the followers (None: skip that, as for a failed group),
        then kill every actor and the placement group (idempotent)."""
        if self.actors and grace_s is not None:
            try:
                ray.get(self.driver.stop.remote(grace_s), timeout=grace_s + 10)
            except Exception as e:  # a dead or hung rank 0 cannot stop gracefully
                log.warning("group %s: graceful stop failed: %s", self.config.name, e)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.actors, self.follower_refs, self.pg, self.pids = [], [], None, []
        self.metrics_port = None
