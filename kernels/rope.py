"""Rotary position embedding, the two layouts our models use.

- ``rope_interleave`` (GLM-5 MLA and DSA indexer): pairs (x0, x1), (x2, x3) ... rotated by one
  angle each, written in transformers' ``apply_rotary_pos_emb_interleave`` output order:
  ``cat(x_even * cos - x_odd * sin, x_odd * cos + x_even * sin)``.
- ``rope_neox`` (glm4_moe): ``rotate_half`` on the first ``rotary_dim`` dims, the rest passed
  through (transformers' ``apply_rotary_pos_emb`` with a partial rotary factor).

``cos``/``sin`` are what transformers' rotary embedding returns, one row per token:
``[T, R]`` = ``cat(freqs, freqs)`` cos/sin (interleave reads only the first half). With
``positions`` they are instead tables ``[max_pos, R]`` indexed by ``positions[t]``.
The math is done in fp32 and rounded once (transformers rounds after each product in bf16).
Legend: T tokens, H heads, D head dim, R rotary dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels._tl import cast_rne

__all__ = ["rope_interleave", "rope_neox", "reference_rope_interleave", "reference_rope_neox"]


@triton.jit
def _kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    out_ptr,
    H,
    D,
    R,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    stride_cos,
    stride_sin,
    INTERLEAVE: tl.constexpr,
    HAS_POS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    hmask = heads < H
    half = R // 2
    i = tl.arange(0, BLOCK_HALF)  # [BHALF] pair / half index
    imask = i < half
    row = t
    if HAS_POS:
        row = tl.load(pos_ptr + t).to(tl.int64)
    x_row = x_ptr + t * stride_xt + heads[:, None].to(tl.int64) * stride_xh  # [BH, 1]
    o_row = out_ptr + t * stride_ot + heads[:, None].to(tl.int64) * stride_oh  # [BH, 1]
    m2 = hmask[:, None] & imask[None, :]  # [BH, BHALF]
    if INTERLEAVE:
        c = tl.load(cos_ptr + row * stride_cos + i, mask=imask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_sin + i, mask=imask, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + 2 * i[None, :], mask=m2, other=0.0).to(tl.float32)  # even dims
        x2 = tl.load(x_row + 2 * i[None, :] + 1, mask=m2, other=0.0).to(tl.float32)  # odd dims
        y1 = x1 * c[None, :] - x2 * s[None, :]
        y2 = x2 * c[None, :] + x1 * s[None, :]
    else:
        c = tl.load(cos_ptr + row * stride_cos + i, mask=imask, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + row * stride_sin + i, mask=imask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + row * stride_cos + half + i, mask=imask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + row * stride_sin + half + i, mask=imask, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + i[None, :], mask=m2, other=0.0).to(tl.float32)  # first half
        x2 = tl.load(x_row + half + i[None, :], mask=m2, other=0.0).to(tl.float32)  # second half
        y1 = x1 * c[None, :] - x2 * s[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    out_ty = out_ptr.dtype.element_ty
    tl.store(o_row + i[None, :], cast_rne(y1, out_ty), mask=m2)
    tl.store(o_row + half + i[None, :], cast_rne(y2, out_ty), mask=m2)
    if BLOCK_PASS > 0:  # dims [R, D) pass through unchanged
        j = R + tl.arange(0, BLOCK_PASS)
        mp = hmask[:, None] & (j < D)[None, :]
        xp = tl.load(x_row + j[None, :], mask=mp, other=0.0)
        tl.store(o_row + j[None, :], xp, mask=mp)


def _check(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None
) -> int:
    assert x.dim() in (2, 3), f"x must be [T, D] or [T, H, D], got {tuple(x.shape)}"
    assert x.stride(-1) == 1, "x needs a unit last stride"
    assert cos.dim() == 2 and cos.shape == sin.shape, (cos.shape, sin.shape)
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert cos.device == x.device and sin.device == x.device
    R = cos.shape[-1]
    assert R % 2 == 0 and 0 < R <= x.shape[-1], (R, x.shape)
    if positions is None:
        assert cos.shape[0] == x.shape[0], "cos/sin need one row per token without positions"
    else:
        assert positions.shape == (x.shape[0],), positions.shape
        assert positions.dtype in (torch.int32, torch.int64) and positions.device == x.device
    return R


def _launch(x, cos, sin, positions, interleave: bool) -> torch.Tensor:
    R = _check(x, cos, sin, positions)
    x3 = x if x.dim() == 3 else x.unsqueeze(1)  # [T, H, D]
    T, H, D = x3.shape
    if interleave:
        assert R == D, "rope_interleave rotates the whole last dim (pass the rope slice)"
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T > 0 and H > 0:
        block_h = min(triton.next_power_of_2(H), 16)
        pos = positions if positions is not None else x3  # dummy pointer when unused
        backend.launch(
            _kernel,
            (T, triton.cdiv(H, block_h)),
            x.device,
            x3,
            cos,
            sin,
            pos,
            out,
            H,
            D,
            R,
            x3.stride(0),
            x3.stride(1),
            out.stride(0),
            out.stride(1),
            cos.stride(0),
            sin.stride(0),
            INTERLEAVE=interleave,
            HAS_POS=positions is not None,
            BLOCK_H=block_h,
            BLOCK_HALF=triton.next_power_of_2(R // 2),
            BLOCK_PASS=triton.next_power_of_2(D - R) if D > R else 0,
        )
    return out if x.dim() == 3 else out.squeeze(1)


def rope_interleave(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Interleaved RoPE. x [T, H, R] or [T, R] (any token/head strides); cos/sin [T, R] (or
    tables [P, R] with positions int [T]). Returns a new tensor shaped like x, in its dtype."""
    return _launch(x, cos, sin, positions, interleave=True)


def rope_neox(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """rotate_half RoPE on the first R dims. x [T, H, D] or [T, D]; cos/sin [T, R], R <= D (or
    tables [P, R] with positions int [T]). Returns a new tensor shaped like x, in its dtype."""
    return _launch(x, cos, sin, positions, interleave=False)


def _rows(cos, sin, positions):
    if positions is not None:
        cos, sin = cos[positions.long()], sin[positions.long()]
    return cos, sin


def reference_rope_interleave(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb_interleave for one tensor (same signature)."""
    R = _check(x, cos, sin, positions)
    assert R == x.shape[-1]
    cos, sin = _rows(cos, sin, positions)
    cos = cos[..., : R // 2]  # [T, R/2]
    sin = sin[..., : R // 2]
    if x.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, R/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_rope_neox(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb (partial rotary) for one tensor (same signature)."""
    R = _check(x, cos, sin, positions)
    cos, sin = _rows(cos, sin, positions)
    if x.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, R]
    x_rot, x_pass = x[..., :R], x[..., R:]
    rotated = torch.cat((-x_rot[..., R // 2 :], x_rot[..., : R // 2]), dim=-1)  # rotate_half
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)
