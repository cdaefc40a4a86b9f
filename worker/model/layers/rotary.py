"""YaRN rotary embedding with DeepSeek's interleaved pair layout (docs/k2-format.md, Math)."""

from __future__ import annotations

import math

import torch
from torch import nn

from k2serve.worker.model.config import ModelConfig, yarn_mscale


def yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Rotary dimension index whose wavelength completes `num_rotations` turns over `max_pos`."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [dim/2] and the cos/sin magnitude scale."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    low = max(math.floor(yarn_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings)), 0)
    high = min(math.ceil(yarn_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 below `low` (original frequency), 0 above `high` (divided by factor)
    inv_freq = inv_freq / rs.factor * (1 - keep) + inv_freq * keep
    magnitude = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return inv_freq, magnitude


class RotaryEmbedding(nn.Module):
    """Rotates adjacent pairs (x0, x1), (x2, x3), ... of the rope dims by position * inv_freq."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.magnitude = yarn_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, dim/2] in float32."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim] with cos/sin [T, dim/2] -> rotated x, same layout and dtype."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        cos, sin = cos.view(shape), sin.view(shape)
        pairs = x.float().unflatten(-1, (-1, 2))  # [T, ..., dim/2, 2]
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
        return out.flatten(-2).to(x.dtype)
