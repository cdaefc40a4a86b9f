"""benchmarks/moe_dispatch.py, dispatch_bytes.py: byte formulas vs hand arithmetic, K2 per-token numbers, a gloo run."""

from __future__ import annotations

import math

import pytest
import torch

from dispatch_bytes import (
    LayerBytes,
    WireFormat,
    all_gather_bytes,
    bytes_per_layer,
    expected_remote_copies,
    expected_remote_ranks,
    num_moe_layers,
    per_token_bytes,
    remote_copies,
)
from moe_dispatch import TimingConfig, k2_table, measure
from k2serve.worker.model.config import ModelConfig


def ids(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_two_rank_routing_bytes_by_hand():
    # W=2, E=4 (rank 0 owns experts 0,1; rank 1 owns 2,3), k=2, H=3, bf16 rows, int64 ids, fp32 weights.
    routing = [ids([[0, 2], [3, 1]]), ids([[2, 3], [0, 1]])]
    # remote: rank 0 sends experts 2 and 3 (2 copies); rank 1 sends experts 0 and 1 (2 copies).
    assert remote_copies(routing, n_local_experts=2) == 4
    got = bytes_per_layer(routing, n_routed_experts=4, fmt=WireFormat(hidden_size=3))
    assert got["all_to_all"] == LayerBytes(
        dispatch=4 * 3 * 2,  # 4 copies x H x bf16 = 24
        routing=(2 - 1) * 4 * 8,  # (W-1) x E int64 per-expert counts = 32 (no ids: counts imply them)
        combine=4 * 3 * 2,  # 24
    )
    assert got["all_to_all"].total == 80
    # all-gather: T=4 tokens, each goes to W-1=1 other rank with its k ids and weights; reduce-scatter half of [4, 3].
    assert got["all_gather"] == LayerBytes(dispatch=1 * 4 * 3 * 2, routing=1 * 4 * 2 * (8 + 4), combine=1 * 4 * 3 * 2)
    assert got["all_gather"].total == 24 + 96 + 24


def test_four_rank_routing_bytes_by_hand():
    # W=4, E=8 (2 per rank), k=1, H=4, one token per rank.
    routing = [ids([[1]]), ids([[0]]), ids([[7]]), ids([[6]])]
    # rank 0 -> expert 1 (own), rank 1 -> expert 0 (rank 0), rank 2 -> expert 7 (rank 3), rank 3 -> expert 6 (own).
    assert remote_copies(routing, n_local_experts=2) == 2
    got = bytes_per_layer(routing, n_routed_experts=8, fmt=WireFormat(hidden_size=4))
    assert got["all_to_all"] == LayerBytes(dispatch=2 * 8, routing=(4 - 1) * 8 * 8, combine=2 * 8)
    # T=4, (W-1)*T = 12 rows cross: 12 x 8 B hidden, 12 x 1 x (8 + 4) B routing, 12 x 8 B partial sums.
    assert got["all_gather"] == LayerBytes(dispatch=96, routing=144, combine=96)


def test_routing_bytes_rejects_uneven_experts():
    with pytest.raises(ValueError, match="n_routed_experts=6 is not divisible by world_size=4"):
        bytes_per_layer([ids([[0]])] * 4, n_routed_experts=6, fmt=WireFormat(hidden_size=4))


def test_fp8_dispatch_row_has_one_scale_per_128_channels():
    assert WireFormat(7168, fp8_dispatch=True).dispatch_row_bytes == 7168 + 56 * 4
    assert WireFormat(200, fp8_dispatch=True).dispatch_row_bytes == 200 + 2 * 4  # a partial last group
    assert WireFormat(7168, fp8_dispatch=True).combine_row_bytes == 7168 * 2  # results come back in bf16
    assert WireFormat(7168).dispatch_row_bytes == 7168 * 2


def test_k2_per_token_bytes_by_hand():
    k2 = ModelConfig()
    assert num_moe_layers(k2) == 60  # 61 layers, layer 0 dense
    assert expected_remote_copies(8, 8) == 7.0  # 8 copies x 7/8 remote
    a2a = per_token_bytes(k2, 8, fp8_dispatch=False)["all_to_all"]
    # payload: 2 (dispatch + combine) x 8 copies x 7/8 remote x 7168 x 2 bytes
    assert a2a.dispatch + a2a.combine == 2 * 8 * 7 / 8 * 7168 * 2 == 200_704
    assert a2a.routing == 0  # no ids travel; the per-layer count exchange is left out
    assert a2a.total * 60 == 12_042_240
    fp8 = per_token_bytes(k2, 8, fp8_dispatch=True)["all_to_all"]
    assert fp8.dispatch == 7 * (7168 + 56 * 4) == 51_744
    assert fp8.combine == 7 * 7168 * 2 == 100_352
    ag = per_token_bytes(k2, 8, fp8_dispatch=False)["all_gather"]
    # the token's row to 7 ranks, with 8 ids + 8 weights; 7 partial-sum rows back from the others
    assert ag == LayerBytes(dispatch=7 * 7168 * 2, routing=7 * 8 * (8 + 4), combine=7 * 7168 * 2)
    assert ag.total == 201_376


def test_expected_remote_ranks_by_hand():
    # E=4, k=2, W=2: a token misses the other rank only if both experts are its own: C(2,2)/C(4,2) = 1/6.
    assert expected_remote_ranks(4, 2, 2) == pytest.approx(5 / 6)
    miss = math.prod((336 - i) / (384 - i) for i in range(8))  # K2: none of 8 experts among another rank's 48
    assert expected_remote_ranks(384, 8, 8) == pytest.approx(7 * (1 - miss))
    assert 4.6 < expected_remote_ranks(384, 8, 8) < 4.65


def test_uniform_routing_matches_expected_remote_fraction():
    gen = torch.Generator().manual_seed(0)
    routing = [torch.rand(2000, 384, generator=gen).topk(8).indices for _ in range(8)]  # distinct experts per token
    frac = remote_copies(routing, n_local_experts=48) / (8 * 2000 * 8)
    assert frac == pytest.approx(7 / 8, abs=0.01)


def test_all_gather_bytes_grow_with_world_size():
    fmt = WireFormat(7168)
    assert all_gather_bytes(1, 16, 8, fmt).total == 15 * (7168 * 2 * 2 + 8 * 12)


def test_k2_table_prints_the_numbers():
    table = k2_table(ModelConfig(), 8)
    assert "200,704" in table and "200,760" in table and "201,376" in table and "152,152" in table  # today, planned


def test_two_rank_gloo_run_agrees_and_times():
    rows = measure(TimingConfig(world_size=2, tokens_per_rank=(3,), warmup=0, repeats=1, dtype="fp32",
                                start_method="fork"))
    (row,) = rows
    assert row["world"] == 2 and row["tokens_per_rank"] == 3
    assert row["rel_err"] < 1e-4  # both dispatchers match one process holding every expert
    assert row["all_to_all_ms"] > 0 and row["all_gather_ms"] > 0
    # tiny config: T=6 tokens, hidden 192 fp32, top-4: all-gather bytes are fixed by T alone
    assert row["all_gather_bytes"] == 1 * 6 * (192 * 4 * 2 + 4 * 12)
    assert row["all_to_all_bytes"] == row["remote_copies"] * 192 * 4 * 2 + (2 - 1) * 16 * 8  # + per-expert counts
    # the formulas equal what the dispatchers handed to their collectives (measure raises otherwise)
    assert row["all_to_all_bytes_counted"] == row["all_to_all_bytes"] > 0
    assert row["all_gather_bytes_counted"] == row["all_gather_bytes"]
