"""WorkerGroup: start, watch and stop one model replica spread over the ranks of a Ray placement group.

Start: a placement group (cluster/placement.py), one RankActor per rank, rendezvous at rank 0's
address on a free port, torch.distributed (NCCL on GPU, gloo on CPU) plus a gloo control group,
every rank loads its shard, ranks > 0 enter their follow loop, rank 0 builds the engine.
Health: a dead actor, a follower whose loop ended, or a ping that times out marks the group unhealthy.
"""

from __future__ import annotations

import logging
import os
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k2serve.cluster.config import GroupSection
from k2serve.cluster.placement import placement_bundles
from k2serve.cluster.rank_actor import RankActor
from k2serve.worker.config import EngineConfig
from k2serve.worker.rank_worker import RankSpec

log = logging.getLogger(__name__)


def _pid(actor) -> int:
    return os.getpid()


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
                        group.collective_timeout_s, group.dispatcher)

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

    def serve(self, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None,
              metrics_port: int | None = None) -> str:
        """Start rank 0's gRPC server (and, with `metrics_port`, 0 = free, its Prometheus endpoint on the
        same host); returns the gRPC address host:port."""
        self.grpc_host = ray.get(self.driver.node_ip.remote()) if host == "0.0.0.0" else host
        self.grpc_port = ray.get(self.driver.serve.remote(host, port, model_name, self.config.name, metrics_port))
        if metrics_port is not None:
            self.metrics_port = ray.get(self.driver.metrics_port.remote())
        return self.address

    @property
    def metrics_address(self) -> str | None:
        """host:port of rank 0's Prometheus endpoint (GET /metrics), or None."""
        return f"{self.grpc_host}:{self.metrics_port}" if self.metrics_port is not None else None

    @property
    def address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    def is_healthy(self, timeout_s: float = 2.0) -> bool:
        """False when a rank died, a follower loop ended, or a rank does not answer within timeout_s."""
        if not self.actors:
            return False
        done, _ = ray.wait(self.follower_refs, timeout=0, num_returns=len(self.follower_refs)) if self.follower_refs else ([], [])
        if done:
            return False
        try:
            ray.get([a.ping.remote() for a in self.actors], timeout=timeout_s)
        except Exception:
            return False
        return True

    def stop(self) -> None:
        """Stop serving, release followers and kill every actor and the placement group (idempotent)."""
        if self.actors:
            try:
                ray.get(self.driver.stop.remote(), timeout=10)
            except Exception as e:  # a dead rank 0 cannot stop gracefully
                log.warning("group %s: graceful stop failed: %s", self.config.name, e)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.actors, self.follower_refs, self.pg, self.pids = [], [], None, []
        self.metrics_port = None
