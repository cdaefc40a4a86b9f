"""`k2serve status`: the worker groups the controller publishes, their health and load, as a table."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

COLUMNS = ("group", "address", "gen", "controller", "grpc", "running", "waiting", "kv_usage", "prefix_hit")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `status` subcommand."""
    p = subparsers.add_parser("status", help="show the worker groups, their health and load", description=__doc__)
    p.add_argument("--discovery", help="the controller's discovery URL (default: http://127.0.0.1:"
                   "<controller.discovery_port> of --config or the defaults)")
    p.add_argument("--config", help="cluster config YAML (for the default discovery port)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=run)
    return p


async def group_row(info, timeout: float, security=None) -> dict:
    """One group's status row: controller health, gRPC health and GetLoad."""
    from k2serve.router.pool.worker import WorkerError
    from k2serve.router.pool.worker_client import WorkerClient

    client = WorkerClient(info.address, security)
    row: dict[str, Any] = {"group": info.name, "address": info.address, "gen": info.generation,
                           "controller": "healthy" if info.healthy else "unhealthy"}
    try:
        row["grpc"] = "serving" if await client.health(timeout=timeout) else "down"
        load = await client.get_load(timeout=timeout)
        row.update(running=load.num_running, waiting=load.num_waiting,
                   kv_usage=round(load.kv_cache_usage, 4), prefix_hit=round(load.prefix_cache_hit_rate, 4))
    except WorkerError as exc:
        row["error"] = exc.message
    finally:
        await client.close()
    return row


async def collect(url: str, timeout: float, security=None) -> list[dict]:
    """Every group's row; `security` (a ClientSecurity) for TLS clusters."""
    from k2serve.router.pool.discovery import HttpDiscovery

    source = HttpDiscovery(url, timeout_s=timeout, security=security)
    try:
        groups = await source.fetch()
    finally:
        await source.close()
    return list(await asyncio.gather(*(group_row(g, timeout, security) for g in groups)))


def table(rows: list[dict]) -> str:
    """Fixed-width table of the rows (missing values as '-')."""
    cells = [list(COLUMNS)] + [[str(r.get(c, "-")) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    errors = [f"{r['group']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + errors) + "\n"


def run(args: argparse.Namespace) -> int:
    from k2serve.cluster.config import ClusterConfig
    from k2serve.cluster.router_cli import discovery_url
    from k2serve.cluster.security import client_security
    from k2serve.router.pool.discovery import DiscoveryError

    config = ClusterConfig.from_file(args.config) if args.config else ClusterConfig()
    url = discovery_url(config, args.discovery)
    try:
        rows = asyncio.run(collect(url, args.timeout, client_security(config.security)))
    except DiscoveryError as exc:
        print(f"k2serve status: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.json else table(rows))
    healthy = [r for r in rows if r["controller"] == "healthy" and r.get("grpc") == "serving"]
    return 0 if healthy else 2
