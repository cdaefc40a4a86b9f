"""Controller: a Ray driver that starts the configured worker groups, watches them and replaces dead ones.

Live groups are published as `GroupEndpoint`s: in-process through `endpoints()`, and over HTTP at
`GET /v1/groups` on the discovery port, which routers running elsewhere poll.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from k2serve.cluster.config import ClusterConfig, GroupSection
from k2serve.cluster.group import WorkerGroup
from k2serve.worker.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupEndpoint:
    name: str
    address: str  # rank 0's gRPC host:port
    healthy: bool
    generation: int  # increments each time the group is replaced
    pids: tuple[int, ...] = ()  # each rank's process id, rank order
    metrics_address: str | None = None  # rank 0's Prometheus host:port (GET /metrics), if served


class ManagedGroup:
    """One configured group and its current incarnation."""

    def __init__(self, config: GroupSection, model_dir: str, engine: EngineConfig, grpc_host: str, grpc_port: int,
                 model_name: str, metrics_port: int | None = None):
        self.config, self.model_dir, self.engine = config, model_dir, engine
        self.grpc_host, self.grpc_port, self.model_name = grpc_host, grpc_port, model_name
        self.metrics_port = metrics_port
        self.group: WorkerGroup | None = None
        self.generation = 0
        self.healthy = False

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        self.group = WorkerGroup(self.config, self.model_dir, self.engine).start()
        self.group.serve(self.grpc_host, self.grpc_port, self.model_name, self.metrics_port)
        self.generation += 1
        self.healthy = True
        log.info("group %s generation %d serving at %s", self.name, self.generation, self.group.address)

    def stop(self) -> None:
        if self.group is not None:
            self.group.stop()
        self.group, self.healthy = None, False

    def endpoint(self) -> GroupEndpoint | None:
        if self.group is None or self.group.grpc_port is None:
            return None
        return GroupEndpoint(self.name, self.group.address, self.healthy, self.generation, tuple(self.group.pids),
                             self.group.metrics_address)


class Controller:
    def __init__(self, config: ClusterConfig, model_dir: str | Path):
        self.config = config
        ports = config.controller
        self.groups = [ManagedGroup(g, str(model_dir), config.engine, ports.worker_grpc_host, ports.worker_grpc_port,
                                    config.model.name, ports.worker_metrics_port) for g in config.groups]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def start(self) -> "Controller":
        """Start every group (in order), then the watcher thread."""
        for g in self.groups:
            g.start()
        self._watcher = threading.Thread(target=self._watch, name="controller-watch", daemon=True)
        self._watcher.start()
        return self

    def endpoints(self) -> list[GroupEndpoint]:
        with self._lock:
            return [e for g in self.groups if (e := g.endpoint()) is not None]

    def _watch(self) -> None:
        interval = self.config.controller.health_interval_s
        while not self._stop.wait(interval):
            for g in self.groups:
                self.check(g)

    def check(self, g: ManagedGroup) -> None:
        """Mark a group unhealthy when it fails its check, and replace it if configured to."""
        if g.group is not None and g.group.is_healthy():
            return
        if g.healthy:
            log.warning("group %s generation %d is unhealthy", g.name, g.generation)
            with self._lock:
                g.healthy = False
        if not self.config.controller.replace_dead_groups or self._stop.is_set():
            return
        with self._lock:
            g.stop()
        try:
            g.start()
        except Exception:
            log.exception("group %s could not be restarted; will retry", g.name)
            with self._lock:
                g.stop()

    def status(self) -> list[dict]:
        return [asdict(e) for e in self.endpoints()]

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        for g in self.groups:
            g.stop()
