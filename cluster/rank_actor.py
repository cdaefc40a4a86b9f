"""RankActor: a Ray actor hosting one RankWorker (threaded, so health pings answer while it works).

Rank 0 serves: `serve` starts the AsyncEngine and the gRPC server on a loop thread; `health` reports
the engine's (serving, draining or failed); `drain` stops taking requests and lets the running ones
finish; `stop` drains and releases the followers. SIGTERM (what Kubernetes sends, or `k2serve drain`)
on rank 0's process stops it the same way within the drain timeout, then exits the process with 0:
the controller sees the group gone and replaces it. With a pid directory, rank 0 writes its pid there
while it serves (cluster/pid_files.py), for `k2serve drain`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import dataclass

import ray

from k2serve.cluster.config import SecuritySection
from k2serve.cluster.pid_files import pid_file, write_pid_file
from k2serve.worker.distributed import free_port
from k2serve.worker.health import SERVING
from k2serve.worker.plan_channel import BroadcastingRunner
from k2serve.worker.rank_worker import RankSpec, RankWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSpec:
    """How rank 0 serves: gRPC bind address and port (0: free), the model id it reports, its group's name,
    its Prometheus port (None: no metrics; 0: free), how long a drain waits for requests in flight, where
    it writes its pid file (None: nowhere), and the port's security (files read on rank 0's host)."""

    host: str = "127.0.0.1"
    port: int = 0
    model_name: str | None = None
    group: str = "group-0"
    metrics_port: int | None = None
    drain_timeout_s: float = 10.0
    pid_dir: str | None = None
    security: SecuritySection = SecuritySection()


class RankActor:
    def __init__(self, spec: RankSpec):
        self.worker = RankWorker(spec)
        self.engine = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the gRPC server's, while it serves
        self._server = None  # rank 0's grpc.aio server, while it serves
        self._served_engine = None  # rank 0's AsyncEngine, once it served (its health outlives the server)
        self._serve_spec: ServeSpec | None = None
        self._port: int | None = None
        self._metrics_server = None  # rank 0's metrics and probe HTTP server (wsgiref), when serving metrics
        self._stopping = threading.Lock()
        self._stopped = False
        if spec.rank == 0 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)  # a threaded actor's __init__ runs on the main thread

    def ping(self) -> int:
        return self.worker.spec.rank

    def health(self) -> tuple[str, str]:
        """(state, reason): rank 0 serving reports its engine's health, any other live rank "serving"."""
        if self._served_engine is None:
            return SERVING, ""
        health = self._served_engine.health()
        return health.state, health.reason

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        return free_port(self.node_ip())

    def join(self, master_addr: str, master_port: int) -> None:
        self.worker.join(master_addr, master_port)

    def load(self) -> int:
        return self.worker.load()

    def parameter_names(self) -> list[str]:
        return self.worker.parameter_names()

    def num_parameters(self) -> int:
        return self.worker.num_parameters()

    def follow(self) -> int:
        return self.worker.follow()

    def execute_plans(self, plans: list) -> list:
        """Rank 0, for tests and tools: run plans through the group and return their logits."""
        return [self.worker.runner.execute(plan).logits for plan in plans]

    def build_engine(self) -> None:
        self.engine = self.worker.build_engine()

    def generate(self, prompts: list[list[int]], params) -> list[list[int]]:
        """Rank 0: offline generation through the whole group."""
        return self.engine.generate(prompts, params)

    def serve(self, spec: ServeSpec) -> int:
        """Rank 0: start the AsyncEngine and the gRPC server on a loop thread; returns the bound port.

        With `spec.metrics_port` the engine records WorkerMetrics(group=spec.group) and a Prometheus
        endpoint serves them at http://host:PORT/metrics (see `metrics_port()`).
        """
        from k2serve.worker.async_engine import AsyncEngine

        rank = self.worker.spec
        engine = AsyncEngine(self.engine, heartbeat_interval_s=rank.heartbeat_interval_s,
                             hang_timeout_s=rank.hang_timeout_s)
        if spec.metrics_port is not None:
            self._serve_metrics(spec.host, spec.metrics_port, spec.group, engine)
        self._server = self._start_server(engine, spec)
        self._served_engine, self._serve_spec, self._port = engine, spec, self._server.k2serve_port
        self._write_pid_file()
        return self._port

    def _start_server(self, engine, spec: ServeSpec):
        """The gRPC server on an event loop of its own thread, which runs until `drain` stops it (a loop
        that ended with the server would drop the rest of stop_worker, whose caller then waits in vain)."""
        from k2serve.cluster.security import server_security
        from k2serve.worker.server import ModelInfo, serve_worker

        security = server_security(spec.security)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True).start()

        async def start():
            engine.start()
            info = ModelInfo.from_model_dir(self.worker.spec.model_dir, spec.model_name, self.engine.max_model_len)
            return await serve_worker(engine, spec.host, spec.port, info, security)

        try:
            return asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def _serve_metrics(self, host: str, port: int, group: str, engine) -> None:
        """The group's series and the readiness probe on rank 0's plain-HTTP port (worker/metrics_server.py)."""
        from prometheus_client import CollectorRegistry

        from k2serve.worker.metrics import WorkerMetrics
        from k2serve.worker.metrics_server import serve_metrics

        registry = CollectorRegistry()
        metrics = WorkerMetrics(registry, group)
        metrics.watch_health(lambda: engine.health().is_serving)
        self.engine.attach_metrics(metrics)
        self._metrics_server = serve_metrics(host, port, registry, lambda: engine.health().is_serving)

    def metrics_port(self) -> int | None:
        """Rank 0: the bound Prometheus port, or None when metrics are not served."""
        return self._metrics_server.server_port if self._metrics_server is not None else None

    def drain(self, grace_s: float) -> int:
        """Rank 0: stop serving gracefully (NOT_SERVING, new requests refused with 503, requests in flight
        given `grace_s`, the rest ended with 503); returns how many were ended. The group stays up."""
        from k2serve.worker.server import stop_worker

        server, loop, self._server, self._loop = self._server, self._loop, None, None
        if server is None:
            return 0
        try:
            return asyncio.run_coroutine_threadsafe(stop_worker(server, grace_s), loop).result(timeout=grace_s + 10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._served_engine.shutdown()
            self._remove_pid_file()

    def stop(self, grace_s: float = 1.0) -> None:
        """Rank 0: drain (for at most `grace_s`), stop the metrics endpoint and release the followers
        (they return from follow()). Idempotent."""
        with self._stopping:
            if self._stopped:
                return
            self._stopped = True
            try:
                self.drain(grace_s)
            except Exception as e:  # stopping anyway: the actor is killed next
                log.warning("gRPC server did not stop cleanly: %r", e)
            self._stop_metrics()
            if isinstance(self.worker.runner, BroadcastingRunner):  # rank 0 of a loaded group
                self.worker.runner.stop_followers()

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def _on_sigterm(self, signum, frame) -> None:
        """Drain on a thread of its own (a signal handler must return at once), then exit with 0."""
        grace = self._serve_spec.drain_timeout_s if self._serve_spec is not None else 0.0
        log.warning("SIGTERM: draining for up to %.0fs, then exiting", grace)
        threading.Thread(target=self._stop_and_exit, args=(grace,), name="sigterm-drain", daemon=True).start()

    def _stop_and_exit(self, grace_s: float) -> None:
        try:
            self.stop(grace_s)
        finally:
            os._exit(0)

    def _pid_file(self):
        spec = self._serve_spec
        if spec is None or spec.pid_dir is None:
            return None
        return pid_file(spec.pid_dir, spec.group, self._port)

    def _write_pid_file(self) -> None:
        path = self._pid_file()
        if path is not None:
            write_pid_file(path)

    def _remove_pid_file(self) -> None:
        path = self._pid_file()
        if path is not None:
            path.unlink(missing_ok=True)
