"""The engines engine_vs_vllm.py compares, behind one small interface.

A `Peer` runs a batch of token-id prompts to exactly the asked lengths (greedy, ignore_eos) and says
how long the batch took. `K2servePeer` is our Engine in this process; `VllmPeer` is vLLM's offline
engine in its own venv, a long-lived subprocess (vllm_peer.py) that answers one JSON line per batch,
so that both sides can be run alternately, as often as asked, without paying vLLM's start-up again.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

VLLM_PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")
STARTUP_TIMEOUT_S = 1800.0  # the first start compiles the model with torch.compile: minutes on 2 cores
PROGRESS_EVERY_S = 30.0


@dataclass
class Run:
    """One batch: each prompt's generated token ids and the batch's wall time."""

    token_ids: list[list[int]]
    seconds: float


class Peer(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> Run: ...

    def close(self) -> None: ...


class K2servePeer:
    """k2serve's Engine (offline, in this process) on the K2-format checkpoint."""

    def __init__(self, model_dir: str | Path, dtype: str, max_num_seqs: int, max_model_len: int):
        from k2serve.worker.config import EngineConfig
        from k2serve.worker.engine import Engine

        self.name = f"k2serve {dtype}"
        blocks = max_num_seqs * -(-max_model_len // 16) + 16
        config = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len, num_kv_blocks=blocks,
                              max_num_batched_tokens=4096, dtype=dtype)
        self.engine = Engine.from_model_dir(model_dir, config)

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> Run:
        from k2serve.worker.request import SamplingParams

        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
        start = time.perf_counter()
        token_ids = self.engine.generate(prompts, params)
        return Run(token_ids, time.perf_counter() - start)

    def close(self) -> None:
        pass


class VllmPeer:
    """vLLM's LLM class in a subprocess of vLLM's venv, on the plain DeepseekV3 checkpoint.

    Its output goes to `log_path`; while it starts, `say` hears about it every PROGRESS_EVERY_S seconds.
    """

    def __init__(self, python: Path, checkpoint: Path, dtype: str, log_path: Path, max_num_seqs: int,
                 max_model_len: int, env: dict[str, str], say: Callable[[str], None] = print):
        self.name, self.log_path, self.say = f"vLLM {dtype}", log_path, say
        cmd = [str(python), str(VLLM_PEER_SCRIPT), "--model", str(checkpoint), "--dtype", dtype,
               "--max-num-seqs", str(max_num_seqs), "--max-model-len", str(max_model_len)]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env={**os.environ, **env})
        try:
            self.startup_s = self._read_reply(STARTUP_TIMEOUT_S, starting=True)["startup_s"]
        except BaseException:
            self.close()
            raise

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> Run:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read_reply(STARTUP_TIMEOUT_S)
        return Run(reply["token_ids"], reply["seconds"])

    def _read_reply(self, timeout_s: float, starting: bool = False) -> dict:
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            readable, _, _ = select.select([self.proc.stdout], [], [], PROGRESS_EVERY_S)
            if readable:
                line = self.proc.stdout.readline()
                if line:
                    return json.loads(line)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if starting:
                self.say(f"  {self.name} still starting ({time.monotonic() - start:.0f} s): {self.log_tail(1)[:140]}")
        raise TimeoutError(f"{self.name} did not answer within {timeout_s:.0f} s; log: {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
