"""`k2serve plan`: parameter counts, KV size, memory per GPU and a hand-checked roofline.

Memory capacities are what CUDA reports (nvidia-smi MiB); "free" figures below are in GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import json

import pytest

from k2serve.cluster import plan_cli
from k2serve.cluster.gpus import GIB, gpu_spec
from k2serve.cluster.plan import (
    PlanConfig,
    a2a_bytes_per_token_per_layer,
    active_params,
    build_plan,
    expected_distinct_experts,
    kv_bytes_per_token,
    link_bandwidth,
    step_cost,
    weight_kinds,
)
from k2serve.worker.model.config import ModelConfig

DEEPSEEK_V3 = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
    "moe_layer_freq": 1, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def plan_for(gpu: str, **kw):
    cfg = PlanConfig(gpu=gpu, **kw)
    return build_plan(ModelConfig(), cfg, gpu_spec(gpu))


def test_k2_parameter_counts():
    m = ModelConfig()
    total = sum(k.params for k in weight_kinds(m, PlanConfig()))
    assert round(total / 1e12, 3) == 1.026
    # active = attention + dense MLP + shared expert + 8 routed experts per MoE layer
    #          + embed_tokens + lm_head + norms + router gate
    active = active_params(m)
    assert round(active / 1e9, 1) == 32.9
    lm_head = m.vocab_size * m.hidden_size
    assert round((active - lm_head) / 1e9, 1) != 32.9  # the definition includes lm_head


def test_deepseek_v3_parameter_counts():
    m = ModelConfig.from_dict(DEEPSEEK_V3)
    total = sum(k.params for k in weight_kinds(m, PlanConfig()))
    assert round(total / 1e9) == 671  # the MTP module (another 14B) is not part of the 671B
    # DeepSeek reports "37B activated"; the same definition as for K2 gives 37.55B
    assert abs(active_params(m) - 37e9) < 0.6e9


def test_kv_cache_per_token_is_70272_bytes_in_bf16():
    m = ModelConfig()
    assert kv_bytes_per_token(m) == (512 + 64) * 61 * 2 == 70_272
    assert round(131072 * kv_bytes_per_token(m) / 1e9, 1) == 9.2  # a 128K sequence, decimal GB


def test_free_memory_after_fp8_weights_h200_and_b200():
    h200, b200 = plan_for("H200"), plan_for("B200")
    assert h200.weights_per_gpu_bytes == b200.weights_per_gpu_bytes
    assert 120 < h200.weights_per_gpu_bytes / GIB < 125  # about 123 GiB of FP8 weights per GPU
    assert 10 <= h200.free_after_weights_bytes / GIB <= 20  # GiB
    assert 50 <= b200.free_after_weights_bytes / GIB <= 60  # GiB
    assert h200.fits and b200.kv_tokens_per_gpu > 3 * h200.kv_tokens_per_gpu


def test_shared_expert_split_saves_memory():
    rep, tp = plan_for("H200"), plan_for("H200", shared_experts="tp")
    saved = rep.weights_per_gpu_bytes - tp.weights_per_gpu_bytes
    assert saved == pytest.approx(60 * 44_050_944 * 7 / 8)


def test_decode_roofline_hand_checked():
    """K2, 8xH200, TP8/EP8, batch 1, 4096 cached tokens, 10 us per collective."""
    m, gpu = ModelConfig(), gpu_spec("H200")
    cfg = PlanConfig(gpu="H200", batch=1, kv_len=4096, collective_latency_us=10.0)
    cost = step_cost(m, cfg, gpu, tokens=1, kv_len=4096, prefill=False)
    fp8 = lambda r, c: r * c + 4 * -(-r // 128) * -(-c // 128)  # noqa: E731  e4m3 + fp32 block scales
    replicated = fp8(1536, 7168) + fp8(576, 7168)  # q_a_proj, kv_a_proj_with_mqa
    split = fp8(64 * 192, 1536) + fp8(64 * 256, 512) + fp8(7168, 64 * 128)  # q_b, kv_b, o_proj
    assert replicated == 15_142_624 and split == 86_004_224
    attention = 61 * (replicated + split / 8)
    expert = 3 * fp8(2048, 7168)
    assert expert == 44_050_944
    shared = 60 * expert
    dense = 3 * fp8(18432, 7168) / 8
    lm_head = 163840 * 7168 * 2 / 8
    norms_router = 2 * (61 * (7168 + 7168 + 1536 + 512) + 7168) + 2 * 60 * 384 * 7168 + 4 * 60 * 384
    routed = 1.0 * 60 * expert  # one token: E[distinct local] = 48 * (1 - (1 - 8/384)) = 1
    kv = 4096 * 70_272 + 70_272  # read the cache, write one token
    embed_row = 7168 * 2
    hbm = attention + dense + shared + lm_head + norms_router + routed + kv + embed_row
    assert cost.hbm_bytes == pytest.approx(hbm)
    memory_s = hbm / 4.8e12
    assert cost.memory_s == pytest.approx(memory_s)
    assert cost.bound == "memory"
    tp_comm = 61 * 2 * (7 / 8 * 7168 * 2 / 450e9 + 10e-6)  # reduce-scatter + all-gather per layer
    copies = 1 / 8 * 8 * 7 / 8  # one token's 8 copies, 7/8 of them leave the rank
    a2a = 60 * (copies * (7168 + 56 * 4) / 450e9 + copies * 7168 * 2 / 450e9 + 2 * 10e-6)
    assert cost.comm_s == pytest.approx(tp_comm + a2a)
    assert cost.step_s == pytest.approx(memory_s + tp_comm + a2a)
    assert memory_s * 1e3 == pytest.approx(1.63, abs=0.01)  # 7.8 GB of HBM reads
    assert cost.step_s * 1e3 == pytest.approx(4.06, abs=0.01)  # + 2.43 ms of collectives: ~246 tok/s


def test_expected_distinct_experts():
    assert expected_distinct_experts(48, 384, 8, 1) == pytest.approx(1.0)
    assert expected_distinct_experts(48, 384, 8, 10_000) == pytest.approx(48.0)
    assert expected_distinct_experts(48, 384, 8, 64) == pytest.approx(48 * (1 - (1 - 8 / 384) ** 64))


def test_all_to_all_bytes_per_token_per_layer():
    m = ModelConfig()
    assert a2a_bytes_per_token_per_layer(m, "fp8") == 8 * (7168 + 56 * 4 + 7168 * 2)
    assert a2a_bytes_per_token_per_layer(m, "bf16") == 8 * (7168 * 2 + 7168 * 2)


def test_links_beyond_nvlink_domain_are_rdma_bound():
    h200, gb200 = gpu_spec("H200"), gpu_spec("GB200")
    assert link_bandwidth(h200, 8) == h200.nvlink_bandwidth
    assert link_bandwidth(h200, 16) == pytest.approx(50e9 / (8 / 15))
    assert link_bandwidth(gb200, 64) == gb200.nvlink_bandwidth


def test_dp_attention_multiplies_kv_capacity_and_cuts_kv_reads():
    tp, dp = plan_for("B200"), plan_for("B200", tp_size=1)
    assert dp.weights_per_gpu_bytes > tp.weights_per_gpu_bytes  # attention weights replicated
    assert dp.kv_tokens_per_group > 7 * tp.kv_tokens_per_group
    assert dp.decode.hbm_bytes < tp.decode.hbm_bytes
    assert dp.sweep[-1].tokens_per_s_per_gpu > tp.sweep[-1].tokens_per_s_per_gpu


def test_throughput_grows_and_latency_falls_with_batch():
    sweep = plan_for("H200").sweep
    per_gpu = [p.tokens_per_s_per_gpu for p in sweep]
    per_user = [p.tokens_per_s_per_user for p in sweep]
    assert per_gpu == sorted(per_gpu) and per_user == sorted(per_user, reverse=True)


@pytest.mark.parametrize("kw, message", [
    ({"num_gpus": 8, "tp_size": 3}, "not a multiple of tp_size"),
    ({"num_gpus": 5, "tp_size": 5}, "n_routed_experts=384 is not divisible by num_gpus=5"),
    ({"shared_experts": "sliced"}, "shared_experts"),
])
def test_invalid_layouts_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        plan_for("H200", **kw)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2serve")
    plan_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_cli_tables_json_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert _cli(["--gpu", "b200", "--batch", "32", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "70,272 bytes/token" in text and "routed_experts" in text and "tok/s/GPU" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(DEEPSEEK_V3))
    assert _cli(["--model-config", str(cfg_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["total_params"] / 1e9) == 671
    assert out["decode"]["step_s"] > 0 and out["gpu"]["name"] == "H200"


def test_cli_reports_bad_layout(capsys):
    assert _cli(["--ep", "4"]) == 2
    assert "--ep 4 must equal --num-gpus 8" in capsys.readouterr().err
