"""`k2serve router`: only the HTTP router, learning the worker groups from the controller (the k8s router
Deployment runs this). Ctrl-C or SIGTERM drains in-flight requests for at most controller.drain_timeout_s.

    k2serve router --config cluster.yaml [--discovery http://CONTROLLER:8001] [--group NAME=HOST:PORT ...]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `router` subcommand."""
    p = subparsers.add_parser("router", help="run only the router (groups from the controller's discovery)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="cluster config YAML (router, balancer, admission, model sections)")
    p.add_argument("--discovery", help="the controller's discovery URL (default: "
                   "http://127.0.0.1:<controller.discovery_port>); GET /v1/groups is polled")
    p.add_argument("--group", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="a fixed worker group instead of discovery (repeatable)")
    p.add_argument("--host", help="bind address (overrides router.host)")
    p.add_argument("--port", type=int, help="port (overrides router.port)")
    p.set_defaults(func=run)
    return p


def discovery_url(config, url: str | None) -> str:
    """The discovery URL: the given one, else the local controller's discovery port (https with TLS)."""
    from k2serve.cluster.security import discovery_scheme

    return url or f"{discovery_scheme(config.security)}://127.0.0.1:{config.controller.discovery_port}"


def static_groups(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=HOST:PORT` strings -> (name, address) pairs."""
    groups = []
    for spec in specs:
        name, sep, address = spec.partition("=")
        if not sep or not name or ":" not in address:
            raise SystemExit(f"--group expects NAME=HOST:PORT, got {spec!r}")
        groups.append((name, address))
    return groups


def make_discovery(args: argparse.Namespace, config):
    from k2serve.cluster.security import client_security
    from k2serve.router.pool.discovery import HttpDiscovery, StaticDiscovery

    if args.group:
        if args.discovery:
            raise SystemExit("use either --discovery or --group, not both")
        return StaticDiscovery(static_groups(args.group))
    return HttpDiscovery(discovery_url(config, args.discovery), security=client_security(config.security))


def run(args: argparse.Namespace) -> int:
    from k2serve.cluster.router_service import build_router_app
    from k2serve.cluster.listener import bind
    from k2serve.cluster.serve_cli import ensure_model, load_config, run_router

    args.address = None
    config = load_config(args)
    sock = bind(config.router.host, config.router.port, "router", config.router.send_buffer_bytes)
    model_dir = ensure_model(config)
    source = make_discovery(args, config)
    where = getattr(source, "url", None) or ", ".join(f"{n}={a}" for n, a in static_groups(args.group))
    print(f"router: worker groups from {where}", file=sys.stderr, flush=True)
    make_app = lambda: build_router_app(config, model_dir, source)  # noqa: E731
    run_router(make_app, sock, config.controller.drain_timeout_s)
    return 0
