"""`k2serve drain`: SIGTERM every worker group served from this host (pod) and wait until they have exited.

A Kubernetes worker pod's preStop hook: each group's rank 0 then stops taking requests, finishes the ones
in flight within controller.drain_timeout_s (ending the rest with a 503 that routers resume on another
group) and exits with 0, before Kubernetes stops the pod's Ray node. Groups are found through the pid
files rank 0 writes into controller.worker_pid_dir.

    k2serve drain --config /etc/k2serve/cluster.yaml [--timeout 110]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `drain` subcommand."""
    p = subparsers.add_parser("drain", help="drain and stop the worker groups served from this host (preStop)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="cluster config YAML (controller.worker_pid_dir)")
    p.add_argument("--pid-dir", help="the pid directory (overrides controller.worker_pid_dir)")
    p.add_argument("--timeout", type=float, help="seconds to wait for the groups to exit "
                   "(default: controller.drain_timeout_s + 15)")
    p.set_defaults(func=run)
    return p


def drain(pid_dir: str, timeout_s: float) -> tuple[int, int]:
    """SIGTERM each live rank 0 recorded in `pid_dir` and wait up to `timeout_s` for all of them to exit
    (the processes, not their pid files, which they remove before exiting); returns (signalled, still running)."""
    from k2serve.cluster.pid_files import live_processes, running

    signalled = live_processes(pid_dir)
    for pid in signalled:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while running(signalled) and time.monotonic() < deadline:
        time.sleep(0.2)
    return len(signalled), len(running(signalled))


def run(args: argparse.Namespace) -> int:
    from k2serve.cluster.config import ClusterConfig

    config = ClusterConfig.from_file(args.config) if args.config else ClusterConfig()
    pid_dir = args.pid_dir or config.controller.worker_pid_dir
    if not pid_dir:
        print("k2serve drain: no pid directory (set controller.worker_pid_dir or pass --pid-dir)", file=sys.stderr)
        return 2
    timeout = args.timeout if args.timeout is not None else config.controller.drain_timeout_s + 15
    signalled, left = drain(pid_dir, timeout)
    print(f"k2serve drain: {signalled} worker group(s) signalled, {signalled - left} exited", file=sys.stderr)
    return 1 if left else 0
