"""Merge split-K (flash-decoding) attention partials into the final output.

A split ``s`` of query row ``n``, head ``h`` holds, over its share of the keys:
``m[n, h, s]`` the running max score (-1e30 when it saw no key), ``l[n, h, s] = sum exp(score - m)``
and ``acc[n, h, s, :] = sum exp(score - m) * value``. The merged output is
``sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s`` with ``M = max_s m_s``; rows that saw no key
at all (l = 0) give 0. Used by mla_decode and gqa_decode. Legend: N rows, H heads, S splits,
Dv value dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels._tl import cast_rne

__all__ = ["attn_combine", "reference_attn_combine", "EMPTY_MAX"]

EMPTY_MAX = -1e30  # the m of a split with no key: finite, so exp(m - M) never sees inf - inf


@triton.jit
def _kernel(
    acc_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    S,
    DV,
    stride_an,
    stride_ah,
    stride_as,
    stride_mn,
    stride_mh,
    stride_on,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)  # [BS]
    smask = s < S
    m = tl.load(m_ptr + n * stride_mn + h * stride_mh + s, mask=smask, other=-3.0e38)  # [BS]
    l = tl.load(l_ptr + n * stride_mn + h * stride_mh + s, mask=smask, other=0.0)  # [BS]
    m_max = tl.max(m, axis=0)
    scale = tl.exp(m - m_max)  # [BS]; masked splits -> 0
    denom = tl.sum(scale * l, axis=0)
    inv = 1.0 / tl.maximum(denom, 1e-30)  # denom >= 1 once any key was seen; else acc = 0
    for d0 in range(0, DV, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)  # [BD]
        dmask = d < DV
        ptrs = acc_ptr + n * stride_an + h * stride_ah + s[:, None] * stride_as + d[None, :]
        acc = tl.load(ptrs, mask=smask[:, None] & dmask[None, :], other=0.0)  # [BS, BD]
        o = tl.sum(acc * scale[:, None], axis=0) * inv  # [BD]
        tl.store(
            out_ptr + n * stride_on + h * stride_oh + d,
            cast_rne(o, out_ptr.dtype.element_ty),
            mask=dmask,
        )


def _check(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor) -> None:
    assert acc.dim() == 4, f"acc must be [N, H, S, Dv], got {tuple(acc.shape)}"
    assert m.shape == acc.shape[:3] and l.shape == m.shape, (acc.shape, m.shape, l.shape)
    assert acc.dtype == m.dtype == l.dtype == torch.float32
    assert acc.stride(-1) == 1 and m.stride(-1) == 1 and l.stride() == m.stride()
    assert m.device == acc.device and l.device == acc.device


def attn_combine(
    acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """acc fp32 [N, H, S, Dv], m/l fp32 [N, H, S] -> out [N, H, Dv] in out_dtype."""
    _check(acc, m, l)
    N, H, S, DV = acc.shape
    out = torch.empty((N, H, DV), dtype=out_dtype, device=acc.device)
    if N * H > 0:
        backend.launch(
            _kernel,
            (N, H),
            acc.device,
            acc,
            m,
            l,
            out,
            S,
            DV,
            acc.stride(0),
            acc.stride(1),
            acc.stride(2),
            m.stride(0),
            m.stride(1),
            out.stride(0),
            out.stride(1),
            BLOCK_S=max(triton.next_power_of_2(S), 2),
            BLOCK_D=min(triton.next_power_of_2(DV), 128),
        )
    return out


def reference_attn_combine(
    acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Plain torch (same signature as attn_combine)."""
    _check(acc, m, l)
    scale = torch.exp(m - m.amax(dim=-1, keepdim=True))  # [N, H, S]
    denom = (scale * l).sum(-1, keepdim=True)  # [N, H, 1]
    num = (acc * scale.unsqueeze(-1)).sum(-2)  # [N, H, Dv]
    return (num / denom.clamp_min(1e-30)).to(out_dtype)
