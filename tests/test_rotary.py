"""YaRN frequencies and the interleaved pair layout (docs/k2-format.md, Math)."""

import torch

from k2serve.worker.model.config import ModelConfig
from k2serve.worker.model.layers.rotary import RotaryEmbedding, yarn_inv_freq


def test_k2_yarn_keeps_dims_0_to_19_and_divides_the_rest_by_32():
    inv_freq, magnitude = yarn_inv_freq(ModelConfig())
    base = 1.0 / 50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert magnitude == 1.0
    assert torch.allclose(inv_freq[:20], base[:20])
    assert torch.allclose(inv_freq[20:], base[20:] / 32)


def test_rotation_is_on_adjacent_pairs():
    rot = RotaryEmbedding(ModelConfig())
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0  # the first pair is (x0, x1)
    cos, sin = rot.cos_sin(torch.tensor([1]))
    y = rot.apply(x, cos, sin)
    assert torch.allclose(y[0, :2], torch.stack([cos[0, 0], sin[0, 0]]))
    assert y[0, 2:].abs().max() == 0
