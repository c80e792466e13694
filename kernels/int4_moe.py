"""Routed-expert MLP over int4 weights (w4a16): the nibbles are dequantized in registers.

Weight format (kvscope's own, group-wise asymmetric int4 along the input dim), for a weight
W [N, K] (out, in) or a stack [E, N, K]::

    group  G = min(group_size, K)            # 128 by default; the whole dim when smaller
    q      uint8 [..., N, ceil(K / 2)]       # byte j: column 2j in the low nibble, 2j+1 high
    scales [..., N, ceil(K / G)]             # fp16 by default
    zeros  [..., N, ceil(K / G)]             # integer zero points 0..15, stored in scales' dtype
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

The last group may be partial (K not a multiple of G). Math is the one of ``kernels.fused_moe``
(gate/up GEMM with SiLU * up fused, then the down GEMM scaled by the routing weight, rows sorted by
expert, sum over k in fp32 in torch). Each weight tile is loaded as bytes, split into its low
(even columns) and high (odd columns) nibbles, dequantized to the activations' dtype in registers
and multiplied with the even and the odd columns of the activation tile: two dots of BLOCK_K / 2,
no reordering and no byte loaded twice. Expert ids outside [0, E) contribute nothing.
Legend: T tokens, k experts per token, E experts, D hidden, I moe intermediate, M = T * k pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import backend
from kernels._tl import cast_rne
from kernels.fused_moe import _blocks, reference_fused_moe

__all__ = [
    "Int4Packed",
    "int4_group",
    "quantize_int4",
    "dequantize_int4",
    "int4_moe",
    "reference_int4_moe",
]


class Int4Packed(NamedTuple):
    """One int4 weight (or a stack of them); see the module doc for the layout."""

    q: torch.Tensor  # uint8 [..., N, ceil(K / 2)]
    scales: torch.Tensor  # [..., N, ceil(K / G)]
    zeros: torch.Tensor  # [..., N, ceil(K / G)]
    in_features: int  # K
    group: int  # G (effective group size)

    def expert(self, e: int) -> Int4Packed:
        """Expert ``e`` of a stack [E, N, ...] as one weight [N, ...]."""
        return Int4Packed(self.q[e], self.scales[e], self.zeros[e], self.in_features, self.group)

    @property
    def out_features(self) -> int:
        return self.q.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scales, self.zeros))


def int4_group(in_features: int, group_size: int = 128) -> int:
    """Effective group size: ``group_size`` along the input dim, or the whole dim when smaller."""
    assert group_size >= 2 and group_size % 2 == 0, group_size
    return min(group_size, in_features)


def quantize_int4(
    w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float16
) -> Int4Packed:
    """W [..., N, K] (any float dtype) -> Int4Packed, round to nearest, range includes 0."""
    K = w.shape[-1]
    G = int4_group(K, group_size)
    ng = -(-K // G)
    wf = w.float()
    pad = ng * G - K
    grouped = F.pad(wf, (0, pad)).view(*w.shape[:-1], ng, G)  # [..., N, ng, G]
    if pad:  # padded columns must not widen the range of the last group
        valid = torch.arange(ng * G, device=w.device).view(ng, G) < K
        lo = grouped.masked_fill(~valid, float("inf")).amin(-1).clamp(max=0.0)
        hi = grouped.masked_fill(~valid, float("-inf")).amax(-1).clamp(min=0.0)
    else:
        lo, hi = grouped.amin(-1).clamp(max=0.0), grouped.amax(-1).clamp(min=0.0)  # [..., N, ng]
    scales = ((hi - lo) / 15.0).to(scale_dtype)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero group
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(grouped / s.unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = q.clamp(0, 15).to(torch.uint8).view(*w.shape[:-1], ng * G)[..., :K]  # [..., N, K]
    if K % 2:
        q = F.pad(q, (0, 1))
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()  # [..., N, ceil(K/2)]
    return Int4Packed(packed, scales.contiguous(), zeros.to(scale_dtype).contiguous(), K, G)


def dequantize_int4(p: Int4Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Int4Packed -> W [..., N, K] in ``dtype`` (math in fp32, one rounding)."""
    lo = (p.q & 0xF).float()
    hi = (p.q >> 4).float()
    q = torch.stack([lo, hi], dim=-1).flatten(-2)[..., : p.in_features]  # [..., N, K]
    g = torch.arange(p.in_features, device=p.q.device) // p.group  # [K] group of each column
    w = (q - p.zeros.float()[..., g]) * p.scales.float()[..., g]
    return w.to(dtype)


@triton.jit
def _dequant_tile(
    q_ptr,
    s_ptr,
    z_ptr,
    rows,
    rmask,
    stride_qn,
    stride_sn,
    k0,
    K,
    GROUP: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """Weight columns k0 .. k0 + BLOCK_K of output rows ``rows``, transposed: (even [BK/2, BN],
    odd [BK/2, BN]) in OUT_DTYPE. Out-of-range elements are 0."""
    j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2] byte index
    k_lo = 2 * j
    k_hi = 2 * j + 1
    m_lo = (k_lo < K)[:, None] & rmask[None, :]
    m_hi = (k_hi < K)[:, None] & rmask[None, :]
    byte = tl.load(q_ptr + rows[None, :] * stride_qn + j[:, None], mask=m_lo, other=0)
    byte = byte.to(tl.int32)
    n_lo = (byte & 0xF).to(tl.float32)  # [BK/2, BN]
    n_hi = ((byte >> 4) & 0xF).to(tl.float32)
    if GROUP_ALIGNED:  # the whole tile lies in one group: one scale / zero per row
        g = k0 // GROUP
        s = tl.load(s_ptr + rows * stride_sn + g, mask=rmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * stride_sn + g, mask=rmask, other=0.0).to(tl.float32)
        w_lo = (n_lo - z[None, :]) * s[None, :]
        w_hi = (n_hi - z[None, :]) * s[None, :]
    else:
        g_lo = (k_lo // GROUP)[:, None]
        g_hi = (k_hi // GROUP)[:, None]
        off = rows[None, :] * stride_sn
        s_lo = tl.load(s_ptr + off + g_lo, mask=m_lo, other=0.0).to(tl.float32)
        z_lo = tl.load(z_ptr + off + g_lo, mask=m_lo, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + off + g_hi, mask=m_hi, other=0.0).to(tl.float32)
        z_hi = tl.load(z_ptr + off + g_hi, mask=m_hi, other=0.0).to(tl.float32)
        w_lo = (n_lo - z_lo) * s_lo
        w_hi = (n_hi - z_hi) * s_hi
    w_lo = tl.where(m_lo, w_lo, 0.0)
    w_hi = tl.where(m_hi, w_hi, 0.0)
    return cast_rne(w_lo, OUT_DTYPE), cast_rne(w_hi, OUT_DTYPE)


@triton.jit
def _gate_up_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    h_ptr,
    pair_ptr,
    blk_expert_ptr,
    blk_start_ptr,
    blk_end_ptr,
    D,
    I,
    TOPK,
    stride_xt,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    stride_hm,
    GROUP: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    blk = tl.program_id(0)
    row_start = tl.load(blk_start_ptr + blk)
    row_end = tl.load(blk_end_ptr + blk)
    if row_start >= row_end:  # padding block past the last expert's rows
        return
    e = tl.load(blk_expert_ptr + blk).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)  # [BM] rows of the sorted pair list
    rmask = rows < row_end
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)  # [BM] t * k + j
    tok = (pair // TOPK).to(tl.int64)  # [BM]
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI] intermediate columns
    cmask = cols < I
    jj = tl.arange(0, BLOCK_K // 2)
    acc_g = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    q_e = q_ptr + e * stride_qe
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_se
    x_rows = x_ptr + tok[:, None] * stride_xt
    for k0 in range(0, D, BLOCK_K):
        d_lo = k0 + 2 * jj  # [BK/2] even columns
        d_hi = d_lo + 1
        a_lo = tl.load(
            x_rows + d_lo[None, :], mask=rmask[:, None] & (d_lo < D)[None, :], other=0.0
        )  # [BM, BK/2]
        a_hi = tl.load(x_rows + d_hi[None, :], mask=rmask[:, None] & (d_hi < D)[None, :], other=0.0)
        g_lo, g_hi = _dequant_tile(
            q_e, s_e, z_e, cols, cmask, stride_qn, stride_sn, k0, D,
            GROUP, GROUP_ALIGNED, BLOCK_K, x_ptr.dtype.element_ty,
        )  # fmt: skip
        u_lo, u_hi = _dequant_tile(
            q_e, s_e, z_e, I + cols, cmask, stride_qn, stride_sn, k0, D,
            GROUP, GROUP_ALIGNED, BLOCK_K, x_ptr.dtype.element_ty,
        )  # fmt: skip
        if DOT_FP32:
            a_lo = a_lo.to(tl.float32)
            a_hi = a_hi.to(tl.float32)
            g_lo = g_lo.to(tl.float32)
            g_hi = g_hi.to(tl.float32)
            u_lo = u_lo.to(tl.float32)
            u_hi = u_hi.to(tl.float32)
        acc_g += tl.dot(a_lo, g_lo, input_precision=DOT_PREC)
        acc_g += tl.dot(a_hi, g_hi, input_precision=DOT_PREC)
        acc_u += tl.dot(a_lo, u_lo, input_precision=DOT_PREC)
        acc_u += tl.dot(a_hi, u_hi, input_precision=DOT_PREC)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, fp32
    tl.store(
        h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :],
        cast_rne(h, h_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


@triton.jit
def _down_kernel(
    h_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    pair_ptr,
    gate_w_ptr,
    blk_expert_ptr,
    blk_start_ptr,
    blk_end_ptr,
    D,
    I,
    stride_hm,
    stride_qe,
    stride_qn,
    stride_se,
    stride_sn,
    stride_ym,
    GROUP: tl.constexpr,
    GROUP_ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    blk = tl.program_id(0)
    row_start = tl.load(blk_start_ptr + blk)
    row_end = tl.load(blk_end_ptr + blk)
    if row_start >= row_end:
        return
    e = tl.load(blk_expert_ptr + blk).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)  # [BM]
    rmask = rows < row_end
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0).to(tl.int64)  # [BM]
    g = tl.load(gate_w_ptr + pair, mask=rmask, other=0.0).to(tl.float32)  # [BM] routing weight
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] hidden columns
    cmask = cols < D
    jj = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q_e = q_ptr + e * stride_qe
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_se
    h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_hm
    for k0 in range(0, I, BLOCK_K):
        i_lo = k0 + 2 * jj  # [BK/2]
        i_hi = i_lo + 1
        a_lo = tl.load(h_rows + i_lo[None, :], mask=rmask[:, None] & (i_lo < I)[None, :], other=0.0)
        a_hi = tl.load(h_rows + i_hi[None, :], mask=rmask[:, None] & (i_hi < I)[None, :], other=0.0)
        w_lo, w_hi = _dequant_tile(
            q_e, s_e, z_e, cols, cmask, stride_qn, stride_sn, k0, I,
            GROUP, GROUP_ALIGNED, BLOCK_K, h_ptr.dtype.element_ty,
        )  # fmt: skip
        if DOT_FP32:
            a_lo = a_lo.to(tl.float32)
            a_hi = a_hi.to(tl.float32)
            w_lo = w_lo.to(tl.float32)
            w_hi = w_hi.to(tl.float32)
        acc += tl.dot(a_lo, w_lo, input_precision=DOT_PREC)
        acc += tl.dot(a_hi, w_hi, input_precision=DOT_PREC)
    acc = acc * g[:, None]
    tl.store(
        y_ptr + pair[:, None] * stride_ym + cols[None, :],
        cast_rne(acc, y_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


def _check(
    x: torch.Tensor,
    gate_up: Int4Packed,
    down: Int4Packed,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    assert x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}"
    T, D = x.shape
    assert gate_up.q.dim() == 3 and gate_up.in_features == D, (gate_up.q.shape, D)
    E, I2 = gate_up.q.shape[:2]
    assert I2 % 2 == 0
    I = I2 // 2
    assert down.q.shape[:2] == (E, D) and down.in_features == I, (down.q.shape, (E, D, I))
    for p, k in ((gate_up, D), (down, I)):
        ng = -(-k // p.group)
        assert p.q.shape[2] == -(-k // 2) and p.q.dtype == torch.uint8, (p.q.shape, p.q.dtype)
        assert p.scales.shape == p.zeros.shape == (*p.q.shape[:2], ng), (p.scales.shape, ng)
        assert p.scales.stride() == p.zeros.stride() and p.scales.stride(-1) == 1
        assert p.q.stride(-1) == 1
        assert p.group % 2 == 0 or p.group == k, p.group  # a byte never straddles two groups
        for t in (p.q, p.scales, p.zeros):
            assert t.device == x.device
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == T, (topk_ids.shape, T)
    assert topk_weights.shape == topk_ids.shape, (topk_weights.shape, topk_ids.shape)
    assert not topk_ids.is_floating_point()
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert x.stride(-1) == 1
    assert topk_ids.device == x.device and topk_weights.device == x.device


def int4_moe(
    x: torch.Tensor,
    gate_up: Int4Packed,
    down: Int4Packed,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts over int4 weights. x [T, D]; gate_up: stack [E, 2I, D] (gate rows first);
    down: stack [E, D, I]; topk_ids int [T, k]; topk_weights [T, k] (fp32). Returns [T, D] in x's
    dtype (sum over k in fp32)."""
    _check(x, gate_up, down, topk_ids, topk_weights)
    T, D = x.shape
    E, I2 = gate_up.q.shape[:2]
    I = I2 // 2
    k = topk_ids.shape[1]
    M = T * k
    if M == 0:
        return torch.zeros_like(x)
    on_cuda = x.device.type == "cuda"
    block_m = 16 if (not on_cuda or M <= 64 * E) else 64  # decode: few rows per expert
    block_k = 64 if on_cuda else 32
    block_n = 64 if on_cuda else 32
    pairs, blk_expert, blk_start, blk_end = _blocks(topk_ids, E, block_m)
    NB = blk_expert.shape[0]
    gate_w = topk_weights.reshape(-1).contiguous()  # [M]
    h = torch.empty((M, I), dtype=x.dtype, device=x.device)  # rows in expert order
    y = torch.zeros((M, D), dtype=x.dtype, device=x.device)  # rows in pair order, weighted
    flags = dict(DOT_FP32=backend.on_interpreter(x.device), DOT_PREC=backend.dot_precision(x.dtype))
    backend.launch(
        _gate_up_kernel,
        (NB, triton.cdiv(I, block_n)),
        x.device,
        x,
        gate_up.q,
        gate_up.scales,
        gate_up.zeros,
        h,
        pairs,
        blk_expert,
        blk_start,
        blk_end,
        D,
        I,
        k,
        x.stride(0),
        gate_up.q.stride(0),
        gate_up.q.stride(1),
        gate_up.scales.stride(0),
        gate_up.scales.stride(1),
        h.stride(0),
        GROUP=gate_up.group,
        GROUP_ALIGNED=gate_up.group % block_k == 0,
        **flags,
        BLOCK_M=block_m,
        BLOCK_I=block_n,
        BLOCK_K=block_k,
    )
    backend.launch(
        _down_kernel,
        (NB, triton.cdiv(D, block_n)),
        x.device,
        h,
        down.q,
        down.scales,
        down.zeros,
        y,
        pairs,
        gate_w,
        blk_expert,
        blk_start,
        blk_end,
        D,
        I,
        h.stride(0),
        down.q.stride(0),
        down.q.stride(1),
        down.scales.stride(0),
        down.scales.stride(1),
        y.stride(0),
        GROUP=down.group,
        GROUP_ALIGNED=down.group % block_k == 0,
        **flags,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y.view(T, k, D).sum(dim=1, dtype=torch.float32).to(x.dtype)


def reference_int4_moe(
    x: torch.Tensor,
    gate_up: Int4Packed,
    down: Int4Packed,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Dequantize the experts that received tokens to x's dtype, then transformers' eager loop
    (``reference_fused_moe``). Same signature as int4_moe."""
    _check(x, gate_up, down, topk_ids, topk_weights)
    E = gate_up.q.shape[0]
    ids = topk_ids.long()
    used = torch.unique(ids[(ids >= 0) & (ids < E)])  # dequantize only these experts
    remap = torch.full((E,), -1, dtype=torch.long, device=x.device)
    remap[used] = torch.arange(used.numel(), device=x.device)
    ids = torch.where((ids >= 0) & (ids < E), remap[ids.clamp(0, E - 1)], -1)
    sub = [Int4Packed(p.q[used], p.scales[used], p.zeros[used], p.in_features, p.group)
           for p in (gate_up, down)]  # fmt: skip
    if used.numel() == 0:
        return torch.zeros_like(x)
    wgu = dequantize_int4(sub[0], x.dtype)
    wd = dequantize_int4(sub[1], x.dtype)
    return reference_fused_moe(x, wgu, wd, ids, topk_weights)
