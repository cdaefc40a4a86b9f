"""benchmarks/engine_vs_vllm.py without vLLM: the checkpoint it writes for vLLM, its dry run, the peer protocol."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine_vs_vllm import agreement, main, print_throughput
from k2serve.worker.loader import Checkpoint
from peers import Run, VllmPeer
from vllm_checkpoint import WEIGHTS_FILE, write_plain_checkpoint


@pytest.fixture(scope="module")
def plain_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return write_plain_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("plain") / "deepseek-v3")


def read_plain(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_plain_weights_are_what_our_loader_computes_with(tiny_model_dir, plain_dir):
    ckpt, written = Checkpoint(tiny_model_dir), read_plain(plain_dir)
    fp8 = [n for n in ckpt.weight_map if ckpt.is_fp8(n)]
    assert len(fp8) > 100 and not any(n.endswith("_scale_inv") for n in written)
    assert set(written) == {n for n in ckpt.weight_map if not n.endswith("_scale_inv")}
    for name in fp8:  # dequantized exactly as k2serve dequantizes them, partial blocks included
        assert written[name].dtype == torch.float32 and torch.equal(written[name], ckpt.read_dense(name)), name
    assert written["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert written["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in written  # per-expert names, as vLLM loads them


def test_plain_config_is_deepseek_v3_without_quantization(tiny_model_dir, plain_dir):
    k2 = json.loads((tiny_model_dir / "config.json").read_text())
    plain = json.loads((plain_dir / "config.json").read_text())
    assert plain["model_type"] == "deepseek_v3" and plain["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "quantization_config" not in plain and plain["torch_dtype"] == "float32"
    same = set(k2) - {"model_type", "quantization_config", "torch_dtype"}
    assert {k: plain[k] for k in same} == {k: k2[k] for k in same}


def test_agreement_counts_requests_and_tokens_before_the_first_mismatch():
    assert agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 3, 4], [5, 6]]) == (1.0, 1.0)
    assert agreement([[1, 2, 3, 4], [5, 6]], [[1, 9, 3, 4], [5, 6]]) == (0.5, 3 / 6)


def test_throughput_table_best_median_and_ratio_of_fastest_dtypes(capsys):
    runs = {"k2serve float32": [Run([], 2.0), Run([], 4.0), Run([], 3.0)], "k2serve bfloat16": [Run([], 8.0)],
            "vLLM bfloat16": [Run([], 5.0)], "vLLM float32": [Run([], 1.0), Run([], 9.0)]}
    ratios = print_throughput({16: runs}, {16: [100, 100]})
    assert ratios == {16: 0.5}  # vLLM float32's best 1 s against k2serve float32's best 2 s
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "| 16 | 200 | 100.0 (66.7) | 25.0 (25.0) | 40.0 (40.0) | 200.0 (40.0) | 0.50x |"


def test_dry_run_checks_the_conversion_and_runs_k2serve(tmp_path, capsys):
    main(["--dry-run", "--concurrency", "1,3", "--min-tokens", "3", "--max-tokens", "6",
          "--work-dir", str(tmp_path), "--venv", str(tmp_path / "venv")])
    out = capsys.readouterr().out
    assert "conversion check: 3 greedy requests identical on both checkpoints" in out
    assert f"--model {tmp_path / 'deepseek-v3-plain'} --dtype float32" in out
    config = json.loads((tmp_path / "deepseek-v3-plain" / "config.json").read_text())
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576  # the latent vLLM's CPU MLA takes


FAKE_VLLM = '''
"""A stand-in for vLLM's LLM class: echoes each prompt's first token, max_tokens times; chatty on stdout."""
from types import SimpleNamespace

class LLM:
    def __init__(self, **kwargs):
        print("fake vLLM starting", kwargs["dtype"])  # must not reach the protocol stream

    def generate(self, inputs, params, use_tqdm=True):
        print("generating")
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[i["prompt_token_ids"][0]] * p.max_tokens)])
                for i, p in zip(inputs, params)]

class SamplingParams:
    def __init__(self, max_tokens, **kwargs):
        self.max_tokens = max_tokens
'''


def fake_vllm(root: Path, source: str = FAKE_VLLM) -> dict[str, str]:
    """A fake `vllm` package under `root`; the environment that puts it on the peer's path."""
    package = root / "vllm"
    (package / "inputs").mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(source))
    (package / "inputs" / "__init__.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                                     "    return {'prompt_token_ids': prompt_token_ids}\n")
    return {"PYTHONPATH": str(root)}


def test_vllm_peer_protocol_over_a_fake_vllm(tmp_path):
    """vllm_peer.py's JSON-lines protocol and VllmPeer's client, with vLLM's LLM class faked (no vLLM here)."""
    env = fake_vllm(tmp_path / "fake")
    peer = VllmPeer(Path(sys.executable), tmp_path, "bfloat16", tmp_path / "peer.log", 4, 64, env)
    try:
        run = peer.generate([[7, 1], [9]], [3, 2])
        assert run.token_ids == [[7, 7, 7], [9, 9]] and run.seconds >= 0
        assert peer.generate([[5]], [1]).token_ids == [[5]]
    finally:
        peer.close()
    assert "fake vLLM starting bfloat16" in (tmp_path / "peer.log").read_text()


def test_engine_profile_times_the_step_parts(tiny_model_dir):
    """engine_profile.py's timers, attached from outside, see every part of the step and sum sensibly."""
    from engine_profile import Timers, instrument
    from peers import K2servePeer

    peer = K2servePeer(tiny_model_dir, "float32", 2, 32)
    timers = Timers()
    instrument(peer.engine, timers)
    run = peer.generate([[1, 2, 3], [4, 5]], [4, 2])
    assert [len(t) for t in run.token_ids] == [4, 2] and timers.calls["step"] == 4
    for region in ("schedule", "execute", "sample", "postprocess", "attention", "moe", "moe.experts (per-expert loop)"):
        assert 0 < timers.seconds[region] <= timers.seconds["step"], region
    assert timers.calls["attention"] == 4 * 3 and timers.calls["moe"] == 4 * 2  # 3 layers, 2 of them MoE


def test_serve_vs_vllm_config_is_a_valid_one_rank_cluster(tmp_path):
    from serve_vs_vllm import k2serve_config

    from k2serve.cluster.config import ClusterConfig

    config = ClusterConfig.from_yaml(k2serve_config(tmp_path / "model", "float32", 18000, 64))
    assert [(g.tp, g.ep) for g in config.groups] == [(1, 1)] and config.router.port == 18000
    assert (config.engine.max_num_seqs, config.engine.dtype) == (64, "float32")


def test_serve_table_best_median_ratio_and_ttft(capsys):
    from serve_vs_vllm import print_table

    def summary(tps, ttft):
        return {"output_throughput": tps, "ttft": {"p50_ms": ttft}}

    runs = {"k2serve serve": [summary(100.0, 30), summary(80.0, 50)], "vllm serve": [summary(200.0, 20)]}
    assert print_table({4: runs}) == {4: 0.5}
    assert capsys.readouterr().out.splitlines()[-1] == "| 4 | 100.0 (90.0) | 200.0 (200.0) | 0.50x | 40 / 20 |"


def test_vllm_peer_that_fails_to_start_says_why(tmp_path):
    env = fake_vllm(tmp_path / "fake", FAKE_VLLM.replace('print("fake vLLM starting", kwargs["dtype"])',
                                                         'raise ValueError("no CPU MLA backend for this head size")'))
    with pytest.raises(RuntimeError, match="vLLM float32 exited with 1:(.|\n)*no CPU MLA backend"):
        VllmPeer(Path(sys.executable), tmp_path, "float32", tmp_path / "peer.log", 4, 64, env)
