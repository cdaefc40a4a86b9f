"""`k2serve serve`: the main job. Ray, the worker groups (via the controller) and the router, in one command.

With no config: the tiny K2-format model (generated on first use), a local Ray, one CPU group with
TP=EP=2, and the router on http://127.0.0.1:8000. Ctrl-C or SIGTERM drains the router (/ready says 503, new
requests get a 503, the ones in flight finish, for at most controller.drain_timeout_s) and then stops every
process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="start Ray, the worker groups and the router (the main job)")
    p.add_argument("--config", help="cluster config YAML (default: the embedded tiny-model setup)")
    p.add_argument("--address", help="join this Ray cluster ('auto' or host:port) instead of starting one")
    p.add_argument("--host", help="router bind address (overrides router.host)")
    p.add_argument("--port", type=int, help="router port (overrides router.port)")
    p.set_defaults(func=run)
    return p


def load_config(args):
    from k2serve.cluster.config import ClusterConfig

    config = ClusterConfig.from_file(args.config) if args.config else ClusterConfig()
    bind = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    ray = config.ray.model_copy(update={"address": args.address}) if args.address else config.ray
    return config.model_copy(update={"router": config.router.model_copy(update=bind), "ray": ray})


def ensure_model(config) -> Path:
    """The configured checkpoint, or the tiny model generated once under K2SERVE_HOME."""
    from k2serve.cluster.environment import default_home
    from k2serve.cluster.tiny import make_tiny_model

    if config.model.path:
        return Path(config.model.path)
    path = default_home() / "tiny-k2"
    if not (path / "config.json").exists():
        print(f"generating the tiny K2-format model in {path}", file=sys.stderr, flush=True)
        make_tiny_model(path, seed=0)
    return path


async def serve_router(make_app, sock: socket.socket, drain_s: float) -> None:
    """Build the app inside the running loop (its gRPC channels bind to it) and serve on `sock` (bound by
    cluster.listener.bind) until a signal, then drain for at most `drain_s` (DrainingServer)."""
    from k2serve.cluster.router_server import DrainingServer

    app = make_app()
    host, port = sock.getsockname()[:2]
    server = DrainingServer(app, host, port, drain_s)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(f"k2serve ready: http://{host}:{port}  (OpenAI /v1/chat/completions, Anthropic /v1/messages, "
              f"/metrics)", flush=True)
    await task


def run_router(make_app, sock: socket.socket, drain_s: float) -> None:
    """serve_router until Ctrl-C or SIGTERM. The router drains, then uvicorn re-raises the signal: here that
    ends the loop as KeyboardInterrupt (SIGTERM's default action would kill the process before Ray is
    stopped)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        asyncio.run(serve_router(make_app, sock, drain_s))
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    from k2serve.cluster.environment import init_ray
    from k2serve.cluster.listener import bind

    config = load_config(args)
    router = config.router
    router_sock = bind(router.host, router.port, "router", router.send_buffer_bytes)
    discovery_sock = bind(router.host, config.controller.discovery_port, "discovery endpoint")
    model_dir = ensure_model(config)
    ray = init_ray(config.ray.num_cpus, config.ray.address)  # before anything imports ray
    from k2serve.cluster.controller import Controller
    from k2serve.cluster.discovery import DiscoveryServer
    from k2serve.cluster.router_service import build_router_app
    from k2serve.router.pool.discovery import CallableDiscovery, GroupInfo

    controller = discovery = None
    try:
        print(f"starting {len(config.groups)} worker group(s)...", file=sys.stderr, flush=True)
        controller = Controller(config, model_dir.resolve()).start()
        discovery = DiscoveryServer(controller, discovery_sock, config.security).start()
        source = CallableDiscovery(lambda: [GroupInfo(e.name, e.address, e.healthy, e.generation)
                                            for e in controller.endpoints()])
        make_app = lambda: build_router_app(config, model_dir, source)  # noqa: E731
        run_router(make_app, router_sock, config.controller.drain_timeout_s)
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        if discovery is not None:
            discovery.stop()
        if controller is not None:
            controller.stop()
        ray.shutdown()
    return 0
