"""The router process's wiring: tokenizer, chat template, metrics and worker backends into the FastAPI app."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry

from cluster.config import ClusterConfig
from router.app import create_app
from router.chat_template import ChatTemplate
from router.metrics import RouterMetrics
from router.tokenizer import K2Tokenizer
from router.worker_client import WorkerClient


def build_router_app(config: ClusterConfig, model_dir: str | Path, addresses: Iterable[str]):
    """A router app over the given worker gRPC addresses (round robin until the balancer pool lands)."""
    router_config = config.router_config().with_generation_config(model_dir)
    if router_config.model_name is None:
        router_config = router_config.model_copy(update={"model_name": config.model.name})
    clients = [WorkerClient(a) for a in addresses]
    metrics = RouterMetrics(CollectorRegistry(), model=config.model.name)
    return create_app(router_config, clients, K2Tokenizer.from_dir(model_dir), ChatTemplate.from_dir(model_dir),
                      metrics=metrics)
