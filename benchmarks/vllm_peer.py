"""vLLM's offline engine as a benchmark peer, driven over stdin/stdout (runs in vLLM's own venv).

    <vllm-venv>/bin/python vllm_peer.py --model PLAIN_CHECKPOINT --dtype bfloat16 [--max-num-seqs 64]

Imports only vLLM and the standard library: it runs under the separate venv that engine_vs_vllm.py
prepares, never under k2serve's. Protocol, one JSON object per line: it writes `{"ready": true,
"startup_s": S}` once the engine is up, then answers each request line `{"prompts": [[ids]],
"max_tokens": [n]}` (greedy, ignore_eos) with `{"token_ids": [[ids]], "seconds": S}`; it exits on end of
input. Everything else vLLM or its worker processes print goes to stderr, so that stdout carries only
the protocol. Token-id prompts with `skip_tokenizer_init=True`: no tokenizer is needed. vLLM's LLM
class spawns processes, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def protocol_stream():
    """A private copy of stdout for the protocol; fd 1 itself (inherited by vLLM's processes) goes to stderr."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def build_llm(args: argparse.Namespace):
    from vllm import LLM

    return LLM(model=args.model, dtype=args.dtype, skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
               max_model_len=args.max_model_len, seed=0, disable_log_stats=True)


def generate(llm, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[list[int]], float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in max_tokens]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return [list(o.outputs[0].token_ids) for o in outputs], seconds


def serve(llm, requests, replies) -> None:
    for line in requests:
        if not line.strip():
            continue
        job = json.loads(line)
        token_ids, seconds = generate(llm, job["prompts"], job["max_tokens"])
        replies.write(json.dumps({"token_ids": token_ids, "seconds": seconds}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a plain DeepseekV3 checkpoint (vllm_checkpoint.py)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args()
    replies = protocol_stream()
    start = time.perf_counter()
    llm = build_llm(args)
    replies.write(json.dumps({"ready": True, "startup_s": time.perf_counter() - start}) + "\n")
    serve(llm, sys.stdin, replies)


if __name__ == "__main__":
    main()
