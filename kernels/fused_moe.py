"""Fused routed-expert MLP (GLM MoE): grouped GEMMs over tokens sorted by expert.

Per (token t, choice j) with expert e = topk_ids[t, j] and weight g = topk_weights[t, j]::

    gate, up = (x[t] @ w_gate_up[e].T).chunk(2)          # w_gate_up [E, 2I, D], gate rows first
    y[t] += g * (silu(gate) * up) @ w_down[e].T           # w_down [E, D, I]

which is transformers' ``GlmMoeDsaExperts`` / ``Glm4MoeExperts`` forward. The (t, j) pairs are
sorted by expert and cut into blocks of BLOCK_M rows of one expert (torch, no host sync). Kernel 1
gathers the rows of x and runs the gate/up GEMM with SiLU * up fused (one [BLOCK_M, I] tile
pair per program); kernel 2 runs the down GEMM, scales by the routing weight and writes each pair's
row; the k rows of a token are summed in fp32 in torch (deterministic, no atomics). Expert ids
outside [0, E) contribute nothing (transformers' masked-expert convention). The shared expert is
not here (a plain MLP in torch).
Legend: T tokens, k experts per token, E experts, D hidden, I moe intermediate, M = T * k pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import backend
from kernels._tl import cast_rne

__all__ = ["fused_moe", "reference_fused_moe"]


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w_ptr,
    h_ptr,
    pair_ptr,
    blk_expert_ptr,
    blk_start_ptr,
    blk_end_ptr,
    D,
    I,
    TOPK,
    stride_xt,
    stride_we,
    stride_wi,
    stride_hm,
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
    kk = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    w_e = w_ptr + e * stride_we
    for k0 in range(0, D, BLOCK_K):
        d = k0 + kk  # [BK]
        dmask = d < D
        a = tl.load(
            x_ptr + tok[:, None] * stride_xt + d[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )  # [BM, BK]
        wmask = dmask[:, None] & cmask[None, :]
        wg = tl.load(
            w_e + cols[None, :] * stride_wi + d[:, None], mask=wmask, other=0.0
        )  # [BK, BI]
        wu = tl.load(w_e + (I + cols[None, :]) * stride_wi + d[:, None], mask=wmask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_g += tl.dot(a, wg, input_precision=DOT_PREC)
        acc_u += tl.dot(a, wu, input_precision=DOT_PREC)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, fp32
    tl.store(
        h_ptr + rows[:, None].to(tl.int64) * stride_hm + cols[None, :],
        cast_rne(h, h_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


@triton.jit
def _down_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    pair_ptr,
    gate_w_ptr,
    blk_expert_ptr,
    blk_start_ptr,
    blk_end_ptr,
    D,
    I,
    stride_hm,
    stride_we,
    stride_wd,
    stride_ym,
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
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_e = w_ptr + e * stride_we
    for k0 in range(0, I, BLOCK_K):
        i = k0 + kk  # [BK]
        imask = i < I
        a = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_hm + i[None, :],
            mask=rmask[:, None] & imask[None, :],
            other=0.0,
        )  # [BM, BK]
        w = tl.load(
            w_e + cols[None, :] * stride_wd + i[:, None],
            mask=imask[:, None] & cmask[None, :],
            other=0.0,
        )  # [BK, BN]
        if DOT_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(a, w, input_precision=DOT_PREC)
    acc = acc * g[:, None]
    tl.store(
        y_ptr + pair[:, None] * stride_ym + cols[None, :],
        cast_rne(acc, y_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


def _check(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    assert x.dim() == 2, f"x must be [T, D], got {tuple(x.shape)}"
    T, D = x.shape
    assert w_gate_up.dim() == 3 and w_gate_up.shape[2] == D, (w_gate_up.shape, D)
    E, I2 = w_gate_up.shape[:2]
    assert I2 % 2 == 0
    assert w_down.shape == (E, D, I2 // 2), (w_down.shape, (E, D, I2 // 2))
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == T, (topk_ids.shape, T)
    assert topk_weights.shape == topk_ids.shape, (topk_weights.shape, topk_ids.shape)
    assert not topk_ids.is_floating_point()
    assert x.dtype == w_gate_up.dtype == w_down.dtype, (x.dtype, w_gate_up.dtype, w_down.dtype)
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert x.stride(-1) == 1 and w_gate_up.stride(-1) == 1 and w_down.stride(-1) == 1
    for t in (w_gate_up, w_down, topk_ids, topk_weights):
        assert t.device == x.device


def _blocks(
    topk_ids: torch.Tensor, E: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (t, j) pairs by expert and cut them into blocks of <= block_m rows of one expert.

    Returns (pairs [M] int32 pair index t * k + j in expert order, blk_expert [NB] int32,
    blk_start [NB] int32, blk_end [NB] int32); NB = cdiv(M, block_m) + min(E, M) is a static upper
    bound, and unused blocks have start == end.
    """
    flat = topk_ids.reshape(-1).long()  # [M]
    M = flat.shape[0]
    flat = torch.where((flat >= 0) & (flat < E), flat, E)  # E = dropped
    pairs = torch.argsort(flat, stable=True)  # [M]
    counts = torch.zeros(E + 1, dtype=torch.int64, device=flat.device)
    counts = counts.scatter_add_(0, flat, torch.ones_like(flat))[:E]  # [E], no host sync
    first_row = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
    nblk = (counts + block_m - 1) // block_m  # [E]
    blk_cum = torch.cumsum(nblk, 0)  # [E]
    NB = triton.cdiv(M, block_m) + min(E, M)
    b = torch.arange(NB, device=flat.device)  # [NB]
    blk_expert = torch.searchsorted(blk_cum, b, right=True)  # [NB], E for padding blocks
    e = blk_expert.clamp(max=E - 1)
    start = first_row[e] + (b - (blk_cum[e] - nblk[e])) * block_m  # [NB]
    end = torch.minimum(start + block_m, first_row[e] + counts[e])
    pad = blk_expert >= E
    start = torch.where(pad, 0, start)
    end = torch.where(pad, 0, end)
    i32 = torch.int32
    return pairs.to(i32), e.to(i32), start.to(i32), end.to(i32)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts. x [T, D]; w_gate_up [E, 2I, D]; w_down [E, D, I]; topk_ids int [T, k];
    topk_weights [T, k] (fp32). Returns [T, D] in x's dtype (sum over k in fp32)."""
    _check(x, w_gate_up, w_down, topk_ids, topk_weights)
    T, D = x.shape
    E, I2 = w_gate_up.shape[:2]
    I = I2 // 2
    k = topk_ids.shape[1]
    M = T * k
    if M == 0:
        return torch.zeros_like(x)
    on_cuda = backend.gpu_sized(x.device)
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
        w_gate_up,
        h,
        pairs,
        blk_expert,
        blk_start,
        blk_end,
        D,
        I,
        k,
        x.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        h.stride(0),
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
        w_down,
        y,
        pairs,
        gate_w,
        blk_expert,
        blk_start,
        blk_end,
        D,
        I,
        h.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        y.stride(0),
        **flags,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return y.view(T, k, D).sum(dim=1, dtype=torch.float32).to(x.dtype)


def reference_fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' eager experts loop, same op order and dtypes (same signature as fused_moe)."""
    _check(x, w_gate_up, w_down, topk_ids, topk_weights)
    E = w_gate_up.shape[0]
    out = torch.zeros_like(x)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        if not 0 <= e < E:
            continue
        tok, pos = torch.where(ids == e)  # [n], [n]
        gate, up = F.linear(x[tok], w_gate_up[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w_down[e])  # [n, D]
        h = h * topk_weights[tok, pos, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out
