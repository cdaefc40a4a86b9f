"""The MLA attention backends behind the layer: selection by device, the Triton and torch backends agreeing
on a mixed step of the tiny model, greedy parity with transformers through the Triton kernel, and an
attention layer that creates no tensor on torch's default device."""

import os

import pytest
import torch

# Kernel tests run on CPU tensors under the Triton interpreter, with or without a GPU; this must
# precede the first import of a module that defines kernels (the @triton.jit decorator reads it).
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed; the attention kernels need it")

from k2serve.kernels.attention_backend import MLABackend, TorchMLABackend, TritonMLABackend  # noqa: E402
from k2serve.kernels.backend import select_attention_backend  # noqa: E402
from k2serve.worker.loader import load_model  # noqa: E402
from k2serve.worker.model.attention_metadata import AttentionMetadata  # noqa: E402
from k2serve.worker.model.deepseek_v3 import allocate_kv_caches  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, progress=False)


def test_selection_by_device_and_by_name():
    assert isinstance(select_attention_backend(CPU), TorchMLABackend)
    assert isinstance(select_attention_backend(CPU, force="triton"), TritonMLABackend)  # the interpreter
    backends = (select_attention_backend(CPU), select_attention_backend(CPU, "triton"))
    assert all(isinstance(b, MLABackend) for b in backends)
    with pytest.raises(ValueError, match="unknown attention backend 'flashmla'"):
        select_attention_backend(CPU, force="flashmla")


def _mixed_step(backend: MLABackend | None, context_lens=(0, 20, 5, 33, 17), new=(9, 1, 6, 1, 1)) -> AttentionMetadata:
    """Prefill chunks (with and without cached context) and decodes interleaved, in scattered blocks."""
    tables, slots, starts, block = [], [], [0], 40
    for ctx, n in zip(context_lens, new):
        table = [block - 1 - 2 * i for i in range(-(-(ctx + n) // 16))]  # descending, every other block
        block -= 2 * len(table)
        tables.append(table)
        slots += [table[p // 16] * 16 + p % 16 for p in range(ctx, ctx + n)]
        starts.append(starts[-1] + n)
    return AttentionMetadata(torch.tensor(slots, device=CPU), starts, list(context_lens), tables, 16, backend)


@torch.no_grad()
def test_triton_and_torch_backends_agree_on_a_mixed_step(model):
    layer = model.model.layers[1].self_attn
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(40, 16, model.config.kv_cache_dim, generator=gen)  # stands for the earlier context
    x = torch.randn(18, model.config.hidden_size, generator=gen)
    positions = torch.tensor([*range(9), 20, *range(5, 11), 33, 17])
    outs = []
    for backend in (TorchMLABackend(), TritonMLABackend(CPU)):
        attn = _mixed_step(backend)
        assert attn.decode_rows.tolist() == [9, 16, 17]
        assert attn.prefill_plan.groups[0].out_rows.tolist() == [*range(9), *range(10, 16)]
        outs.append(layer(x, positions, model.model.rotary, attn, cache.clone()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_greedy_through_the_triton_kernel_matches_transformers(model, tiny_model_dir):
    from hf_reference import load_hf_model

    ids, steps = [5, 77, 300, 12, 900, 1000, 4, 8, 15, 16, 23, 42], 6
    hf = load_hf_model(tiny_model_dir)
    want = hf.generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    caches, backend, seq, new = allocate_kv_caches(model.config, 4, 16), TritonMLABackend(CPU), list(ids), list(ids)
    while len(seq) < len(ids) + steps:
        ctx = len(seq) - len(new)
        slots = torch.tensor([[3, 0][p // 16] * 16 + p % 16 for p in range(ctx, len(seq))])
        attn = AttentionMetadata(slots, [0, len(new)], [ctx], [[3, 0]], 16, backend)
        hidden = model(torch.tensor(new), torch.arange(ctx, len(seq)), attn, caches)
        new = [int(model.compute_logits(hidden[-1:]).argmax(-1))]
        seq += new
    assert seq[len(ids):] == want


@torch.no_grad()
def test_attention_creates_no_tensor_on_the_default_device(model):
    """With torch's default device set to `meta`, a tensor the layer or the metadata creates without an
    explicit device lands on meta and fails when it meets the real (CPU) ones."""
    layer = model.model.layers[0].self_attn
    cache = torch.zeros(40, 16, model.config.kv_cache_dim)
    x = torch.randn(18, model.config.hidden_size)
    positions = torch.tensor([*range(9), 20, *range(5, 11), 33, 17])
    want = layer(x, positions, model.model.rotary, _mixed_step(None), cache.clone())
    torch.set_default_device("meta")
    try:
        got = layer(x, positions, model.model.rotary, _mixed_step(select_attention_backend(CPU)), cache.clone())
    finally:
        torch.set_default_device(None)
    assert got.device == CPU
    torch.testing.assert_close(got, want)
