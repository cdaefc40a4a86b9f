"""`k2serve generate`: offline generation on the engine, in one process or through a worker group."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from k2serve.worker.config import EngineConfig
from k2serve.worker.request import SamplingParams


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="offline generation (no server)")
    p.add_argument("--model", required=True, help="checkpoint directory (K2 format)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw prompt text (no chat template)")
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    src.add_argument("--prompt-file", help="file of prompts: one raw text per line, or JSONL with 'prompt' or 'prompt_ids'")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens tokens")
    p.add_argument("--concurrency", type=int, default=64, help="requests batched together (max_num_seqs)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (a Ray worker group when > 1)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (defaults to --tp)")
    p.add_argument("--dtype", default="float32", help="activation/KV dtype, e.g. float32 or bfloat16")
    p.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...} per prompt')
    p.set_defaults(func=run)
    return p


def read_prompts(args, tokenizer) -> list[list[int]]:
    if args.prompt_ids:
        return [[int(t) for t in args.prompt_ids.split(",") if t.strip()]]
    if args.prompt is not None:
        return [tokenizer.encode(args.prompt)]
    prompts = []
    for line in Path(args.prompt_file).read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            item = json.loads(line)
            prompts.append(item["prompt_ids"] if "prompt_ids" in item else tokenizer.encode(item["prompt"]))
        else:
            prompts.append(tokenizer.encode(line))
    return prompts


def generate_local(args, prompts, params) -> list[list[int]]:
    from k2serve.worker.engine import Engine

    config = EngineConfig(max_num_seqs=args.concurrency, dtype=args.dtype)
    return Engine.from_model_dir(args.model, config).generate(prompts, params)


def generate_group(args, prompts, params) -> list[list[int]]:
    from k2serve.cluster.environment import init_ray

    ray = init_ray(num_cpus=max(2, args.tp))  # before anything imports ray
    from k2serve.cluster.config import GroupSection
    from k2serve.cluster.group import WorkerGroup

    ep = args.ep or args.tp
    config = EngineConfig(max_num_seqs=args.concurrency, dtype=args.dtype)
    group = WorkerGroup(GroupSection(name="generate", tp=args.tp, ep=ep), str(Path(args.model).resolve()), config)
    try:
        group.start()
        return ray.get(group.driver.generate.remote(prompts, params))
    finally:
        group.stop()
        ray.shutdown()


def run(args: argparse.Namespace) -> int:
    from k2serve.router.text.tokenizer import K2Tokenizer

    tokenizer = K2Tokenizer.from_dir(args.model)
    prompts = read_prompts(args, tokenizer)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)
    start = time.perf_counter()
    outputs = (generate_group if args.tp > 1 or (args.ep or 1) > 1 else generate_local)(args, prompts, params)
    elapsed = time.perf_counter() - start
    for ids in outputs:
        text = tokenizer.decode(ids)
        print(json.dumps({"token_ids": ids, "text": text}, ensure_ascii=False) if args.json else text)
    if len(prompts) > 1:
        n = sum(len(o) for o in outputs)
        print(f"{len(prompts)} prompts, {n} tokens in {elapsed:.2f}s: {n / elapsed:.1f} tokens/s", file=sys.stderr)
    return 0
