"""The router process's wiring: tokenizer, chat template, metrics and a GroupPool into the FastAPI app."""

from __future__ import annotations

import functools
from pathlib import Path

from prometheus_client import CollectorRegistry

from k2serve.cluster.config import ClusterConfig
from k2serve.cluster.security import client_security
from k2serve.router.app import create_app
from k2serve.router.pool.admission import AdmissionControl
from k2serve.router.pool.balancer import Balancer
from k2serve.router.text.chat_template import ChatTemplate
from k2serve.router.pool.discovery import Discovery
from k2serve.router.pool.group_pool import GroupPool, GroupPoolConfig
from k2serve.router.pool.migration import MigrationConfig
from k2serve.router.pool.worker_client import WorkerClient
from k2serve.router.metrics import RouterMetrics
from k2serve.router.text.tokenizer import K2Tokenizer


def build_pool(config: ClusterConfig, discovery: Discovery, metrics: RouterMetrics | None = None) -> GroupPool:
    """A GroupPool with the cluster config's balancer, admission limits, retry and migration limits, health
    interval and the credentials its workers require."""
    router = config.router
    migration = {name: getattr(router, name) for name in MigrationConfig.model_fields}
    pool_config = GroupPoolConfig(poll_interval_s=config.controller.health_interval_s, **migration)
    client = functools.partial(WorkerClient, security=client_security(config.security),
                               max_buffered_responses=router.max_buffered_responses)
    return GroupPool(discovery, Balancer(router), AdmissionControl(router.max_concurrency, router.max_queue),
                     metrics, pool_config, client_factory=client)


def build_router_app(config: ClusterConfig, model_dir: str | Path, discovery: Discovery):
    """The router app over the worker groups `discovery` reports.

    Call it inside the serving event loop: the pool's poll task and gRPC channels belong to that loop.
    The pool is on `app.state.pool`.
    """
    router_config = config.router.with_env().with_generation_config(model_dir)
    if router_config.model_name is None:
        router_config = router_config.model_copy(update={"model_name": config.model.name})
    metrics = RouterMetrics(CollectorRegistry(), model=router_config.model_name)
    pool = build_pool(config, discovery, metrics).start()
    app = create_app(router_config, pool, K2Tokenizer.from_dir(model_dir), ChatTemplate.from_dir(model_dir),
                     metrics=metrics)
    app.state.pool = pool
    return app
