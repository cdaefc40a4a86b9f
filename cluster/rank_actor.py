"""RankActor: a Ray actor hosting one RankWorker (threaded, so health pings answer while it works)."""

from __future__ import annotations

import asyncio
import logging
import threading

import ray

from k2serve.worker.distributed import free_port
from k2serve.worker.plan_channel import BroadcastingRunner
from k2serve.worker.rank_worker import RankSpec, RankWorker

log = logging.getLogger(__name__)


class RankActor:
    def __init__(self, spec: RankSpec):
        self.worker = RankWorker(spec)
        self.engine = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = None
        self._metrics_server = None  # rank 0's Prometheus HTTP server (wsgiref), when serving metrics

    def ping(self) -> int:
        return self.worker.spec.rank

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
        return [self.worker.runner.execute(plan) for plan in plans]

    def build_engine(self) -> None:
        self.engine = self.worker.build_engine()

    def generate(self, prompts: list[list[int]], params) -> list[list[int]]:
        """Rank 0: offline generation through the whole group."""
        return self.engine.generate(prompts, params)

    def serve(self, host: str, port: int, model_name: str | None = None, group: str = "group-0",
              metrics_port: int | None = None) -> int:
        """Rank 0: start the AsyncEngine and the gRPC server on a loop thread; returns the bound port.

        With `metrics_port` (0: a free port) the engine records WorkerMetrics(group=`group`) and a
        Prometheus endpoint serves them at http://host:PORT/metrics (see `metrics_port()`).
        """
        from k2serve.worker.async_engine import AsyncEngine
        from k2serve.worker.server import ModelInfo, serve_worker

        if metrics_port is not None:
            self._serve_metrics(host, metrics_port, group)
        ready = threading.Event()
        result: dict = {}

        async def main():
            engine = AsyncEngine(self.engine)
            engine.start()
            info = ModelInfo.from_model_dir(self.worker.spec.model_dir, model_name, self.engine.max_model_len)
            server = await serve_worker(engine, host, port, info)
            result.update(port=server.k2serve_port, server=server, engine=engine)
            ready.set()
            await server.wait_for_termination()

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            except Exception as e:  # reported through `ready`
                result["error"] = e
                ready.set()

        threading.Thread(target=run, name="grpc-loop", daemon=True).start()
        ready.wait()
        if "error" in result:
            raise result["error"]
        self._serving = result
        return result["port"]

    def _serve_metrics(self, host: str, port: int, group: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from k2serve.worker.metrics import WorkerMetrics

        registry = CollectorRegistry()
        self.engine.attach_metrics(WorkerMetrics(registry, group))
        self._metrics_server, _ = start_http_server(port, addr=host, registry=registry)

    def metrics_port(self) -> int | None:
        """Rank 0: the bound Prometheus port, or None when metrics are not served."""
        return self._metrics_server.server_port if self._metrics_server is not None else None

    def stop(self) -> None:
        """Rank 0: stop serving and release the followers (they return from follow())."""
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._serving and self._loop:
            from k2serve.worker.server import stop_worker

            fut = asyncio.run_coroutine_threadsafe(stop_worker(self._serving["server"], 1.0), self._loop)
            try:
                fut.result(timeout=5)
            except Exception as e:  # stopping anyway: the actor is killed next
                log.warning("gRPC server did not stop cleanly: %r", e)
            self._serving["engine"].shutdown()
        if isinstance(self.worker.runner, BroadcastingRunner):  # rank 0 of a loaded group
            self.worker.runner.stop_followers()
