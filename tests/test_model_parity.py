"""Our DeepSeek-V3/K2 model vs Hugging Face transformers' DeepseekV3ForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch

from hf_reference import load_hf_model
from k2serve.cluster.tiny import make_tiny_model
from k2serve.worker.loader import load_model
from k2serve.worker.model.attention_metadata import AttentionMetadata
from k2serve.worker.model.deepseek_v3 import allocate_kv_caches

PROMPTS = [[5, 77, 300, 12, 900, 1000, 4, 8, 15, 16, 23, 42], [1, 2, 3], [640, 11, 259, 1023, 7, 7, 7, 99]]


def prefill_logits(model, ids: list[int]) -> torch.Tensor:
    caches = allocate_kv_caches(model.config, 32, 16)
    attn = AttentionMetadata.contiguous([len(ids)], [0], 16)
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), attn, caches)
    return model.compute_logits(hidden)


def greedy(model, ids: list[int], n: int) -> list[int]:
    """Prefill, then n decode steps over the latent cache (absorbed MLA)."""
    caches = allocate_kv_caches(model.config, 32, 16)
    block_table = list(range(32))
    seq, out = list(ids), []
    new = list(ids)
    while len(out) < n:
        ctx = len(seq) - len(new)
        attn = AttentionMetadata(
            slot_mapping=torch.arange(ctx, len(seq)), query_start_loc=[0, len(new)],
            context_lens=[ctx], block_tables=[block_table], block_size=16,
        )
        hidden = model(torch.tensor(new), torch.arange(ctx, len(seq)), attn, caches)
        token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        out.append(token)
        seq.append(token)
        new = [token]
    return out


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return load_model(tiny_model_dir, progress=False), load_hf_model(tiny_model_dir)


@torch.no_grad()
@pytest.mark.parametrize("ids", PROMPTS)
def test_prefill_logits_match_transformers(models, ids):
    ours, hf = models
    ref = hf(torch.tensor([ids])).logits[0]
    got = prefill_logits(ours, ids)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@torch.no_grad()
def test_greedy_32_tokens_match_transformers(models):
    ours, hf = models
    for ids in PROMPTS:
        assert greedy(ours, ids, 32) == hf_greedy(hf, ids, 32)


@torch.no_grad()
def test_absorbed_decode_matches_expanded_prefill(models):
    """Token-by-token decode over the latent cache gives the logits of one full prefill."""
    ours, _ = models
    ids = PROMPTS[0] + [3, 141, 59, 265, 358, 979]
    full = prefill_logits(ours, ids)
    caches = allocate_kv_caches(ours.config, 32, 16)
    for pos in range(len(ids)):
        attn = AttentionMetadata(torch.tensor([pos]), [0, 1], [pos], [list(range(32))], 16)
        logits = ours.compute_logits(ours(torch.tensor([ids[pos]]), torch.tensor([pos]), attn, caches))
        assert torch.allclose(logits[0], full[pos], rtol=1e-4, atol=1e-5), f"position {pos}"


@torch.no_grad()
def test_deepseek_v3_style_group_limited_routing(tmp_path):
    """n_group > 1 (DeepSeek-V3): group-limited selection must match transformers too."""
    path = make_tiny_model(tmp_path / "dsv3", seed=3, config_overrides=dict(n_group=4, topk_group=2, first_k_dense_replace=2, num_hidden_layers=3, routed_scaling_factor=2.5, rope_theta=10000.0))
    ours, hf = load_model(path, progress=False), load_hf_model(path)
    assert ours.config.n_group == 4
    for ids in PROMPTS[:2]:
        ref = hf(torch.tensor([ids])).logits[0]
        assert torch.allclose(prefill_logits(ours, ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert greedy(ours, PROMPTS[0], 32) == hf_greedy(hf, PROMPTS[0], 32)


def test_group_selection_differs_from_plain_topk():
    """The group mask is exercised: with groups, some plain top-k choices fall outside the kept groups."""
    from k2serve.worker.model.config import ModelConfig
    from k2serve.worker.model.layers.router import TopKRouter

    cfg = ModelConfig(hidden_size=8, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=1)
    router = TopKRouter(cfg)
    torch.manual_seed(0)
    router.weight.copy_(torch.randn(16, 8))
    x = torch.randn(64, 8)
    ids, weights = router(x)
    assert ((ids // 4) == (ids[:, :1] // 4)).all(), "with topk_group=1 all experts come from one group"
    assert torch.allclose(weights.sum(-1), torch.full((64,), cfg.routed_scaling_factor))


@torch.no_grad()
def test_mla_k2_widths_preset_matches_transformers(tmp_path):
    """The preset other engines load (K2's real MLA widths: 576-wide latent, 192-wide q.k heads)."""
    path = make_tiny_model(tmp_path / "mla", seed=0, preset="mla-k2-widths")
    ours, hf = load_model(path, progress=False), load_hf_model(path)
    assert ours.config.kv_cache_dim == 576 and ours.config.qk_head_dim == 192
    ids = PROMPTS[0]
    ref = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(prefill_logits(ours, ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert greedy(ours, ids, 24) == hf_greedy(hf, ids, 24)
