"""`k2serve restart`: a rolling restart of the worker groups, one at a time, through the controller.

Each group drains (no new requests; those in flight finish within controller.drain_timeout_s or `--grace`,
the rest end with a 503 that routers resume on another group), stops and starts again, and serves before
the next one drains, so that the others carry the load meanwhile.

    k2serve restart [--discovery http://CONTROLLER:8001] [--group NAME ...] [--grace S] [--wait]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `restart` subcommand."""
    p = subparsers.add_parser("restart", help="rolling restart of the worker groups (one at a time)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--discovery", help="the controller's discovery URL (default: http://127.0.0.1:"
                   "<controller.discovery_port> of --config or the defaults)")
    p.add_argument("--config", help="cluster config YAML (for the default discovery port)")
    p.add_argument("--group", action="append", default=None, metavar="NAME", help="restart only these (repeatable)")
    p.add_argument("--grace", type=float, help="drain time per group in seconds (default: controller.drain_timeout_s)")
    p.add_argument("--wait", action="store_true", help="return once every group restarted and is healthy")
    p.add_argument("--timeout", type=float, default=3600.0, help="with --wait: give up after this many seconds")
    p.set_defaults(func=run)
    return p


def generations(client, url: str) -> dict[str, tuple[int, bool]]:
    """name -> (generation, healthy) of the groups the controller publishes now."""
    body = client.get(url + "/v1/groups").raise_for_status().json()
    return {g["name"]: (g["generation"], g["healthy"]) for g in body["groups"]}


def wait_restarted(client, url: str, before: dict[str, tuple[int, bool]], names: list[str], timeout_s: float) -> bool:
    """Poll until each of `names` serves healthy with a newer generation than in `before`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            now = generations(client, url)
        except Exception:  # noqa: BLE001 - the controller is busy or restarting its endpoint: poll again
            now = {}
        if all(n in now and now[n][1] and now[n][0] > before.get(n, (0, True))[0] for n in names):
            return True
        time.sleep(1.0)
    return False


def http_client(security):
    """An httpx client for the discovery port, presenting `security`'s credentials when it has them."""
    import httpx

    if security is None:
        return httpx.Client(timeout=10)
    def verify_server_name(request) -> None:
        request.extensions.update(security.http_extensions())
    return httpx.Client(timeout=10, verify=security.ssl_context(), headers=security.http_headers(),
                        event_hooks={"request": [verify_server_name]})


def run(args: argparse.Namespace) -> int:
    import httpx

    from k2serve.cluster.config import ClusterConfig
    from k2serve.cluster.router_cli import discovery_url
    from k2serve.cluster.security import client_security

    config = ClusterConfig.from_file(args.config) if args.config else ClusterConfig()
    url = discovery_url(config, args.discovery).rstrip("/")
    try:
        with http_client(client_security(config.security)) as client:
            return restart(client, url, args)
    except httpx.HTTPError as exc:
        print(f"k2serve restart: {url}: {exc}", file=sys.stderr)
        return 1


def restart(client, url: str, args: argparse.Namespace) -> int:
    before = generations(client, url)
    resp = client.post(url + "/v1/groups/restart", json={"groups": args.group, "grace_s": args.grace})
    if resp.status_code != 202:
        print(f"k2serve restart: {resp.status_code} {resp.json().get('error', resp.text)}", file=sys.stderr)
        return 1
    names = resp.json()["restarting"]
    print(f"k2serve restart: restarting {', '.join(names)} one at a time", file=sys.stderr, flush=True)
    if args.wait and not wait_restarted(client, url, before, names, args.timeout):
        print("k2serve restart: not every group came back in time", file=sys.stderr)
        return 1
    return 0
