"""`k2serve config`: print the documented default cluster config, or validate a config file."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `config` subcommand."""
    p = subparsers.add_parser("config", help="print the default cluster config or check a config file",
                              description=__doc__)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--print-defaults", action="store_true", help="print every key with its default and description")
    action.add_argument("--check", metavar="FILE", help="validate FILE; exit 1 with the reason when invalid")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from k2serve.cluster.config import ClusterConfig, describe_defaults

    if args.print_defaults:
        sys.stdout.write(describe_defaults())
        return 0
    try:
        config = ClusterConfig.from_file(args.check)
    except (OSError, ValueError) as exc:
        print(f"{args.check}: invalid: {exc}", file=sys.stderr)
        return 1
    print(f"{args.check}: ok ({len(config.groups)} group(s): {', '.join(g.name for g in config.groups)})")
    return 0
