"""`k2serve plan`: parameter counts, KV size, memory per layout, the slowest rank's expert load against a
simulation, the wire bytes shared with benchmarks/moe_dispatch.py, every collective of a step, derating,
overlap, layouts, and the plan against published numbers.

Memory capacities are what CUDA reports (nvidia-smi MiB); "free" figures below are in GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dispatch_bytes import per_token_bytes
from k2serve.cluster import plan_cli
from k2serve.cluster.efficiency import Efficiency
from k2serve.cluster.expert_load import (
    expected_distinct_experts,
    expected_max_binomial,
    expert_load,
    rank_imbalance_from_expert_counts,
)
from k2serve.cluster.gpus import GIB, gpu_spec
from k2serve.cluster.layout import best_layout, compare_layouts, default_attention_tp
from k2serve.cluster.moe_wire import WireFormat
from k2serve.cluster.plan import PlanConfig, build_plan, mixed_output_rate
from k2serve.cluster.plan_step import link_bandwidth, step_cost
from k2serve.cluster.plan_weights import active_params, kinds_by_name, kv_bytes_per_token, weight_kinds
from k2serve.worker.model.config import ModelConfig
from moe_dispatch import payload_summary
from plan_vs_published import DEEPSEEK_V3, PUBLISHED, planned, table

K2 = ModelConfig()
EXPERT_BYTES = 44_050_944  # 3 x (2048 x 7168 e4m3 + 16 x 56 fp32 scales)


def plan_for(gpu: str, **kw):
    cfg = PlanConfig(gpu=gpu, **kw)
    return build_plan(K2, cfg, gpu_spec(gpu))


def fp8(rows: int, cols: int) -> int:
    return rows * cols + 4 * -(-rows // 128) * -(-cols // 128)  # e4m3 + fp32 block scales


# ---------------------------------------------------------------- parameters and memory


def test_k2_parameter_counts():
    total = sum(k.params for k in weight_kinds(K2, 8, 8))
    assert round(total / 1e12, 3) == 1.026
    # active = attention + dense MLP + shared expert + 8 routed experts per MoE layer + embed + lm_head + norms + gate
    assert round(active_params(K2) / 1e9, 1) == 32.9
    assert round((active_params(K2) - K2.vocab_size * K2.hidden_size) / 1e9, 1) != 32.9  # lm_head is included


def test_deepseek_v3_parameter_counts():
    m = ModelConfig.from_dict(DEEPSEEK_V3)
    assert round(sum(k.params for k in weight_kinds(m, 8, 8)) / 1e9) == 671  # the 14B MTP module is not counted
    assert abs(active_params(m) - 37e9) < 0.6e9  # DeepSeek reports "37B activated"; this definition gives 37.55B


def test_kv_cache_per_token_is_70272_bytes_in_bf16():
    assert kv_bytes_per_token(K2) == (512 + 64) * 61 * 2 == 70_272
    assert round(131072 * kv_bytes_per_token(K2) / 1e9, 1) == 9.2  # a 128K sequence, decimal GB


def test_free_memory_after_fp8_weights_h200_and_b200():
    h200, b200 = plan_for("H200"), plan_for("B200")
    assert h200.weights_per_gpu_bytes == b200.weights_per_gpu_bytes
    assert 120 < h200.weights_per_gpu_bytes / GIB < 125  # about 123 GiB of FP8 weights per GPU
    assert 10 <= h200.free_after_weights_bytes / GIB <= 20
    assert 50 <= b200.free_after_weights_bytes / GIB <= 60
    assert h200.fits and b200.kv_tokens_per_gpu > 3 * h200.kv_tokens_per_gpu


def test_shared_expert_split_saves_memory():
    rep, tp = plan_for("H200"), plan_for("H200", shared_experts="tp")
    assert rep.weights_per_gpu_bytes - tp.weights_per_gpu_bytes == pytest.approx(60 * EXPERT_BYTES * 7 / 8)


def test_dp_layout_replicates_attention_dense_layer_and_lm_head_never_splits_them_over_the_group():
    """tp = 1: attention, the dense MLP and embed/lm_head are whole on every GPU; tp = 2: halved."""
    split = fp8(64 * 192, 1536) + fp8(64 * 256, 512) + fp8(7168, 64 * 128)  # q_b, kv_b, o_proj
    replicated = fp8(1536, 7168) + fp8(576, 7168)  # q_a, kv_a
    dense, embed = 3 * fp8(18432, 7168), 2 * 163840 * 7168 * 2
    for tp in (1, 2, 8):
        kinds = kinds_by_name(weight_kinds(K2, num_gpus=8, tp=tp))
        assert kinds["attention"].bytes_per_gpu == pytest.approx(61 * (replicated + split / tp))
        assert kinds["dense_mlp"].bytes_per_gpu == pytest.approx(dense / tp)
        assert kinds["embed_lm_head"].bytes_per_gpu == pytest.approx(embed / tp)
        assert kinds["routed_experts"].bytes_per_gpu == pytest.approx(60 * 384 * EXPERT_BYTES / 8)


def test_kv_capacity_counts_one_latent_per_partition():
    tp8, tp2, tp1 = plan_for("B200", context_len=131072), plan_for("B200", tp_size=2, context_len=131072), \
        plan_for("B200", tp_size=1, context_len=131072)
    for plan, dp in ((tp8, 1), (tp2, 4), (tp1, 8)):
        assert plan.kv_tokens_per_group == dp * plan.kv_tokens_per_gpu
        assert plan.max_sequences == plan.kv_tokens_per_gpu // 131072 * dp
    assert (tp8.max_sequences, tp1.max_sequences) == (6, 40)  # the "about 6" against "about 40"
    assert tp1.weights_per_gpu_bytes - tp8.weights_per_gpu_bytes > 8 * GIB  # what replication costs


# ---------------------------------------------------------------- the slowest rank's expert load


def simulate_slowest_rank(n_experts: int, top_k: int, world: int, tokens: int, trials: int, seed: int = 0):
    """Monte Carlo: every token picks top_k distinct experts uniformly; mean over trials of the largest
    per-rank token copies and distinct experts (experts placed contiguously, E / W per rank)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(trials, tokens, n_experts, generator=gen).topk(top_k, dim=-1).indices  # [trials, T, k]
    flat = (ids + n_experts * torch.arange(trials)[:, None, None]).reshape(-1)
    counts = torch.bincount(flat, minlength=trials * n_experts).view(trials, world, n_experts // world)
    return counts.sum(-1).amax(-1).float().mean().item(), (counts > 0).sum(-1).amax(-1).float().mean().item()


@pytest.mark.parametrize("world, tokens, tol", [(8, 1, 0.08), (8, 16, 0.05), (8, 128, 0.03), (32, 64, 0.03)])
def test_slowest_rank_load_matches_a_simulation_of_top8_of_384(world, tokens, tol):
    load = expert_load(384, 8, world, tokens)
    copies, experts = simulate_slowest_rank(384, 8, world, tokens, trials=400)
    assert load.max_copies == pytest.approx(copies, rel=tol)
    assert load.max_experts == pytest.approx(experts, rel=0.03)
    assert load.mean_copies == 8 * tokens / world
    assert copies > 1.1 * load.mean_copies  # the slowest rank is not the mean one


def test_expected_max_binomial_by_hand():
    assert expected_max_binomial(1, 0.5, 2) == pytest.approx(0.75)  # max of two coin flips
    assert expected_max_binomial(2, 0.5, 1) == pytest.approx(1.0)  # one draw: the mean
    assert expected_max_binomial(10, 1.0, 4) == 10.0 and expected_max_binomial(10, 0.0, 4) == 0.0


def test_expected_distinct_experts():
    assert expected_distinct_experts(48, 384, 8, 1) == pytest.approx(1.0)
    assert expected_distinct_experts(48, 384, 8, 10_000) == pytest.approx(48.0)
    assert expected_distinct_experts(48, 384, 8, 64) == pytest.approx(48 * (1 - (1 - 8 / 384) ** 64))


def test_measured_skew_raises_the_slowest_rank():
    # rank 0 (experts 0, 1) gets 6 of 8 copies in layer 0, rank 1 gets 2: max/mean = 6 / 4; layer 1 balanced
    assert rank_imbalance_from_expert_counts([[3, 3, 1, 1], [2, 2, 2, 2]], world_size=2) == pytest.approx(1.25)
    uniform, skewed = expert_load(384, 8, 8, 4096), expert_load(384, 8, 8, 4096, rank_imbalance=1.5)
    assert uniform.max_copies < 1.1 * uniform.mean_copies
    assert skewed.max_copies == pytest.approx(1.5 * uniform.mean_copies)
    with pytest.raises(ValueError, match="at least 1.0"):
        expert_load(384, 8, 8, 64, rank_imbalance=0.5)
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        rank_imbalance_from_expert_counts([[1, 2, 3, 4]], world_size=3)


# ---------------------------------------------------------------- wire bytes and collectives


def test_planned_wire_format_by_hand():
    fp8_fmt, bf16_fmt = WireFormat.target(7168, True), WireFormat.target(7168, False)
    assert fp8_fmt.dispatch_row_bytes == 7168 + 56 * 4 and bf16_fmt.dispatch_row_bytes == 7168 * 2
    assert fp8_fmt.routing_bytes_per_copy == 4 + 4  # int32 expert id + fp32 routing weight
    assert fp8_fmt.combine_row_bytes == 7168 * 2 and fp8_fmt.count_bytes == 4
    # one token, 7 of its 8 copies leave an 8-rank group: out with metadata, back in bf16
    assert plan_for("H200").a2a_bytes_per_token_per_layer == 7 * (7168 + 224 + 8) + 7 * 14336 == 152_152
    assert plan_for("H200", dispatch_dtype="bf16").a2a_bytes_per_token_per_layer == 7 * (14336 + 8 + 14336)


@pytest.mark.parametrize("dtype", ["fp8", "bf16"])
def test_planner_and_dispatch_benchmark_count_the_same_bytes(dtype):
    plan = plan_for("H200", dispatch_dtype=dtype)
    bench = per_token_bytes(K2, 8, fp8_dispatch=dtype == "fp8")["all_to_all_target"]
    assert plan.a2a_bytes_per_token_per_layer == bench.total
    assert f"{plan.a2a_bytes_per_token_per_layer:,.0f} B with {dtype} rows" in payload_summary(K2, 8)


def test_every_collective_of_a_decode_step_is_counted():
    names = lambda plan: {c.name: c.per_step for c in plan.decode.collectives}  # noqa: E731
    tp8, tp2, tp1 = plan_for("H200"), plan_for("H200", tp_size=2), plan_for("H200", tp_size=1)
    moe = {"moe count exchange": 60, "moe dispatch": 60, "moe combine": 60}
    assert names(tp1) == moe  # full DP attention: no collective but the MoE's three per layer
    assert names(tp8) == moe | {"attn reduce-scatter (MoE layers)": 60, "attn all-gather (MoE layers)": 60,
                                "dense-layer all-reduce (o_proj, MLP)": 2, "embedding all-reduce": 1,
                                "lm_head logits all-gather": 1}
    assert tp8.decode.num_collectives == 304 and tp1.decode.num_collectives == 180
    assert {c.group_size for c in tp2.decode.collectives if not c.name.startswith("moe")} == {2}  # never over W
    overlapped = plan_for("H200", tp_size=1, overlap=True)
    assert overlapped.decode.num_collectives == 360  # two micro-batches: every collective twice


def test_decode_step_hand_checked():
    """K2, 8xH200, TP8/EP8, batch 1, 4,096 cached tokens, no derating, 10 us per collective."""
    cfg = PlanConfig(gpu="H200", batch=1, kv_len=4096, efficiency=Efficiency.ideal())
    cost = step_cost(K2, cfg, gpu_spec("H200"), tokens=1, kv_len=4096, prefill=False)
    attention = 61 * (fp8(1536, 7168) + fp8(576, 7168) + (fp8(64 * 192, 1536) + fp8(64 * 256, 512)
                                                          + fp8(7168, 64 * 128)) / 8)
    dense, shared, lm_head = 3 * fp8(18432, 7168) / 8, 60 * EXPERT_BYTES, 163840 * 7168 * 2 / 8
    norms_router = 2 * (61 * (7168 + 7168 + 1536 + 512) + 7168) + 2 * 60 * 384 * 7168 + 4 * 60 * 384
    assert cost.dense.hbm_bytes == pytest.approx(attention + dense + shared + lm_head + norms_router + 7168 * 2)
    assert cost.attention.hbm_bytes == 4096 * 70_272 + 70_272  # read the cache, write one token
    slowest_experts = expected_max_binomial(48, 8 / 384, 8)  # one token: its 8 experts over 8 ranks of 48
    assert 2.5 < slowest_experts < 2.6  # not the mean of 1
    assert cost.experts.hbm_bytes == pytest.approx(slowest_experts * EXPERT_BYTES * 60)
    assert cost.compute_s == pytest.approx(cost.hbm_bytes / 4.8e12)  # memory-bound at one token
    hot_copies = expected_max_binomial(8, 1 / 8, 8) * 7 / 8
    row, lat = 7 / 8 * 7168 * 2, 10e-6
    comm = 60 * (7 * 4 / 450e9 + lat) + 60 * (hot_copies * (7168 + 224 + 8) / 450e9 + lat) \
        + 60 * (hot_copies * 14336 / 450e9 + lat) + 2 * 60 * (row / 450e9 + lat) + 3 * (2 * row / 450e9 + lat) \
        + (7 / 8 * 163840 * 4 / 450e9 + lat)
    assert cost.comm_s == pytest.approx(comm)
    assert cost.step_s == pytest.approx(cost.compute_s + comm)
    assert 3.0e-3 < comm < 3.1e-3  # 304 collectives: latency dominates one user's step


def test_derating_scales_each_kind_of_work():
    ideal = plan_for("H200", batch=64, kv_len=2048, efficiency=Efficiency.ideal()).decode
    derated = plan_for("H200", batch=64, kv_len=2048).decode
    e = Efficiency()
    assert derated.dense.memory_s == pytest.approx(ideal.dense.memory_s / e.gemm_hbm)
    assert derated.attention.memory_s == pytest.approx(ideal.attention.memory_s / e.attention_hbm)
    assert derated.experts.memory_s == pytest.approx(ideal.experts.memory_s / e.grouped_gemm_hbm)
    assert derated.experts.flops_s == pytest.approx(ideal.experts.flops_s / e.grouped_gemm_flops)
    assert derated.step_s > ideal.step_s
    with pytest.raises(ValueError, match="link=1.5 must be in"):
        Efficiency(link=1.5)


def test_overlap_hides_the_smaller_of_compute_and_communication():
    serial, overlapped = plan_for("H100", tp_size=1, batch=1024).decode, plan_for(
        "H100", tp_size=1, batch=1024, overlap=True).decode
    assert serial.step_s == pytest.approx(serial.compute_s + serial.comm_s)
    assert overlapped.step_s == pytest.approx(max(overlapped.compute_s, overlapped.comm_s))
    assert overlapped.comm_bytes == pytest.approx(serial.comm_bytes)  # same bytes, twice the calls
    assert overlapped.step_s < serial.step_s


def test_links_beyond_nvlink_domain_are_rdma_bound():
    h200, gb200 = gpu_spec("H200"), gpu_spec("GB200")
    assert link_bandwidth(h200, 8) == h200.nvlink_bandwidth
    assert link_bandwidth(h200, 16) == pytest.approx(50e9 / (8 / 15))
    assert link_bandwidth(gb200, 64) == gb200.nvlink_bandwidth


def test_mixed_output_rate_by_hand():
    plan = plan_for("H200", tp_size=1, batch=512, kv_len=2048)
    prefill_s = 512 * 1024 * plan.prefill.step_s / plan.prefill.tokens
    expected = 512 * 2048 / (2048 * plan.decode.step_s + prefill_s) / 8
    assert mixed_output_rate(plan.decode, plan.prefill, 512, 1024, 2048, 8) == pytest.approx(expected)


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("kw, message", [
    ({"num_gpus": 8, "tp_size": 3}, r"tp_size=3 does not divide num_gpus=8.*choose tp_size from \[1, 2, 4, 8\]"),
    ({"num_gpus": 12, "tp_size": 12}, "num_attention_heads=64 is not divisible by tp_size=12"),
    ({"num_gpus": 5, "tp_size": 5}, "n_routed_experts=384 is not divisible by num_gpus=5"),
    ({"shared_experts": "sliced"}, "shared_experts"),
    ({"rank_imbalance": 0.9}, "at least 1.0"),
])
def test_invalid_layouts_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        plan_for("H200", **kw)


def test_best_layout_for_k2_on_8_b200_and_8_h200():
    b200 = compare_layouts(K2, PlanConfig(gpu="B200"))
    h200 = compare_layouts(K2, PlanConfig(gpu="H200"))
    assert [r.tp_size for r in b200] == [8, 4, 2, 1]
    assert best_layout(b200).tp_size == 1  # 40 sequences of 128K instead of 6, ~5x the decode rate
    by_tp = {r.tp_size: r for r in h200}
    assert by_tp[1].sequences_long == 0  # replicated attention + lm_head leave no room for a 128K sequence
    assert by_tp[2].sequences_long == 4 and best_layout(h200).tp_size == 2
    assert by_tp[2].decode_short_tokens_per_s_per_gpu > 2 * by_tp[8].decode_short_tokens_per_s_per_gpu


def test_default_attention_tp_imports_nothing_heavy():
    code = ("import sys; from k2serve.cluster.layout import default_attention_tp; "
            "print(default_attention_tp('b200', 8), default_attention_tp('H200', 8), "
            "'torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "2", "False", "False"]
    assert default_attention_tp("H200", 8) == 2


# ---------------------------------------------------------------- against published numbers


@pytest.mark.parametrize("row", [r for r in PUBLISHED if not r.explained], ids=lambda r: r.setup[:40])
def test_plan_within_2x_of_published(row):
    assert 0.5 <= planned(row) / row.figure <= 2.0


def test_readme_shows_the_current_plan_against_published():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for line in table(Efficiency()).splitlines():
        assert line in readme


def test_derating_brings_the_plan_down_from_the_roofline():
    rows = [r for r in PUBLISHED if not r.explained]
    assert all(planned(r, Efficiency.ideal()) > planned(r) for r in rows)


# ---------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="k2serve")
    plan_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_cli_tables_json_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert _cli(["--gpu", "b200", "--batch", "32", "--layouts", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "70,272 bytes/token" in text and "routed_experts" in text and "tok/s/GPU" in text
    assert "moe dispatch" in text and "slowest of 8 ranks" in text and "best layout: tp 1 x dp 8" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(DEEPSEEK_V3))
    assert _cli(["--model-config", str(cfg_file), "--json", "--isl", "1024", "--osl", "2048"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["total_params"] / 1e9) == 671
    assert out["decode"]["step_s"] > 0 and out["gpu"]["name"] == "H200"
    assert out["config"]["kv_len"] == 2048 and out["mixed_output_tokens_per_s_per_gpu"] > 0


def test_cli_ep_sets_the_group_and_expert_counts_set_the_skew(tmp_path, capsys):
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps([[30] * 48 + [10] * 336]))  # rank 0's experts three times as popular
    assert _cli(["--ep", "8", "--tp", "1", "--expert-counts", str(counts), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["num_gpus"] == 8 and out["config"]["tp_size"] == 1
    assert out["config"]["rank_imbalance"] == pytest.approx(1440 / ((1440 + 3360) / 8))


def test_cli_reports_bad_layout(capsys):
    assert _cli(["--ep", "4", "--num-gpus", "8"]) == 2
    assert "--ep 4 must equal --num-gpus 8" in capsys.readouterr().err
    assert _cli(["--tp", "3"]) == 2
    assert "tp_size=3 does not divide num_gpus=8" in capsys.readouterr().err
    assert _cli(["--isl", "1024"]) == 2
    assert "--isl and --osl go together" in capsys.readouterr().err
