"""`k2serve`: the command line. Each subcommand lives in its own module exposing register(subparsers)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def register_make_tiny_model(subparsers: Any) -> None:
    p = subparsers.add_parser("make-tiny-model", help="write a tiny checkpoint in Kimi K2's exact format")
    p.add_argument("dir", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny", choices=["tiny", "mla-k2-widths"],
                   help="shape: tiny (every dimension small) or mla-k2-widths (K2's real MLA widths: kv_lora_rank 512, "
                        "qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128; the rest tiny), which peers such "
                        "as vLLM's CPU MLA backend can load")
    p.set_defaults(func=run_make_tiny_model)


def run_make_tiny_model(args: argparse.Namespace) -> int:
    from k2serve.cluster.tiny import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed, preset=args.preset))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from k2serve.cluster import (bench_cli, config_cli, drain_cli, generate_cli, plan_cli, restart_cli, router_cli,
                                 serve_cli, status_cli)

    parser = argparse.ArgumentParser(prog="k2serve", description="Serve Kimi K2 on a cluster.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING: quiet)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register_make_tiny_model(subparsers)
    for module in (generate_cli, plan_cli, bench_cli, serve_cli, router_cli, status_cli, restart_cli, drain_cli,
                   config_cli):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format='{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}')
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
