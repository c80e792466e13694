"""Rotary position embeddings: interleaved (GLM-5 MLA and DSA indexer) and neox partial (GLM-4.x).

Shapes: T tokens, H heads, R rotary channels (even). cos/sin tables are [T, R/2].
"""

from __future__ import annotations

import math

import torch

from runtime.model_config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin scaling (yarn attention factor)."""
    rope, dim = cfg.rope, cfg.rotary_dim
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    orig = rope.original_max_position_embeddings or cfg.max_position_embeddings
    if rope.mscale and rope.mscale_all_dim:
        attention = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


class RotaryTables:
    """cos/sin lookup for absolute positions, computed exactly as the HF reference does."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        inv_freq, self.scaling = _inv_freq(cfg)
        self.inv_freq = inv_freq.to(device)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, R/2]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos = (freqs.cos() * self.scaling).to(dtype)
        sin = (freqs.sin() * self.scaling).to(dtype)
        return cos, sin


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x0,x1),(x2,x3),... ; output laid out as cat(even', odd') like HF.

    x [T, ..., R]; cos/sin [T, R/2] broadcast over the middle dims.
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rope_neox_partial(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotate-half RoPE on the first R channels of x [T, H, D]; the rest pass through."""
    rot = cos.shape[-1] * 2
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rot,)
    c = torch.cat([cos, cos], dim=-1).view(shape)
    s = torch.cat([sin, sin], dim=-1).view(shape)
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * c + rotated * s, xp], dim=-1)
