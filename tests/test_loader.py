"""Block-FP8 round trips and the loader: dequantization, slicing, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from k2serve.kernels.block_fp8 import FP8_DTYPE, block_scale_shape, dequantize_block_fp8, quantize_block_fp8
from k2serve.worker.loader import Checkpoint, CheckpointError, load_model
from k2serve.worker.model.config import ModelConfig


@pytest.mark.parametrize("shape", [(128, 128), (144, 192), (1, 300), (257, 129), (96, 96)])
def test_block_fp8_round_trip_with_partial_blocks(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])[None, :]
    q, s = quantize_block_fp8(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and tuple(s.shape) == block_scale_shape(shape)
    back = dequantize_block_fp8(q, s)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values inside the block's normal range.
    amax = torch.zeros_like(w)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            amax[blk] = w[blk].abs().max()
    assert ((back - w).abs() <= w.abs() / 16 + amax * 2.0**-9 + 1e-12).all()


def test_dequantize_matches_independent_loop():
    torch.manual_seed(1)
    q = (torch.randn(200, 150) * 50).clamp(-448, 448).to(FP8_DTYPE)
    s = torch.rand(2, 2) + 0.1
    want = torch.empty(200, 150)
    for r in range(200):
        for c in range(150):
            want[r, c] = q[r, c].float() * s[r // 128, c // 128]
    assert torch.equal(dequantize_block_fp8(q, s), want)


def independent_dequant(tensors, name):
    q, s = tensors[name], tensors[name + "_scale_inv"]
    rows = torch.arange(q.shape[0])[:, None] // 128
    cols = torch.arange(q.shape[1])[None, :] // 128
    return q.float() * s[rows, cols]


def test_loader_dequantizes_like_independent_computation(tiny_model_dir):
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(tiny_model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    model = load_model(tiny_model_dir, progress=False)
    params = dict(model.named_parameters())
    checked = 0
    for name, t in tensors.items():
        if name + "_scale_inv" in tensors:
            assert t.dtype == FP8_DTYPE
            assert torch.equal(params[name], independent_dequant(tensors, name)), name
            checked += 1
    assert checked > 20
    assert torch.equal(params["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"].float())
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in tensors  # present on disk, skipped by the loader


def test_loader_slices_rows_across_partial_blocks(tiny_model_dir):
    ckpt = Checkpoint(tiny_model_dir)
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 144 rows = 1.125 blocks
    full = ckpt.read_dense(name)
    assert torch.equal(ckpt.read_dense(name, slice(100, 144), slice(50, 190)), full[100:144, 50:190])
    assert torch.equal(ckpt.read_dense(name, slice(0, 72)), full[:72])


def rewrite_tensor(model_dir, name, new):
    """Copy of a checkpoint dir with one tensor replaced (new=None removes it)."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][name]
    from safetensors.torch import load_file

    tensors = load_file(model_dir / shard)
    if new is None:
        del tensors[name]
        del index["weight_map"][name]
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, model_dir / shard)


@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path):
    import shutil

    return shutil.copytree(tiny_model_dir, tmp_path / "copy")


def test_missing_tensor_is_named(tiny_copy):
    rewrite_tensor(tiny_copy, "model.layers.1.mlp.experts.3.up_proj.weight", None)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight.*missing"):
        load_model(tiny_copy, progress=False)


def test_shape_mismatch_is_named(tiny_copy):
    rewrite_tensor(tiny_copy, "model.norm.weight", torch.ones(191, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(191,\)"):
        load_model(tiny_copy, progress=False)


def test_k2_config_numbers():
    c = ModelConfig()
    assert c.kv_cache_dim == 576 and c.qk_head_dim == 192
    assert abs(c.softmax_scale - 0.130861) < 1e-6


def test_fp8_mode_keeps_the_checkpoint_bytes_and_stacks_experts(tiny_model_dir):
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(tiny_model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    model = load_model(tiny_model_dir, progress=False, fp8_backend="torch")
    params = dict(model.named_parameters())
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert params[name].dtype == FP8_DTYPE
    assert torch.equal(params[name].view(torch.uint8), tensors[name].view(torch.uint8))
    assert torch.equal(params[name + "_scale_inv"], tensors[name + "_scale_inv"])
    experts = model.model.layers[1].mlp.experts
    assert experts.is_fused and experts.w13_fp8.shape == (16, 2 * 96, 192)
    assert not any(".mlp.experts." in n for n in params), "per-expert copies are dropped after stacking"
    gate = tensors["model.layers.1.mlp.experts.5.gate_proj.weight"]
    assert torch.equal(experts.w13_fp8[5, :96].view(torch.uint8), gate.view(torch.uint8))
