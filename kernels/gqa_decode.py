"""Paged GQA attention for glm4_moe decode (and chunked prefill), flash-decoding style.

Query row ``n`` (of sequence ``row_seq[n]``, default ``n``) attends to positions
``[0, row_limit[n])`` of its sequence, read from the K and V planes
``[num_slots, page_size, Hkv, D]`` through ``page_table [B, max_pages]`` (position p lives at
slot ``page_table[b, p // page_size]``, offset ``p % page_size``). Query head h uses kv head
``h // (Hq / Hkv)`` (transformers' repeat_kv). For decode ``row_limit = seq_lens``; for a chunk
of prefill tokens each row's limit is its position + 1 (causal).

The Triton kernel splits each row's keys into ``num_splits`` ranges (one program per row, kv
head, split), runs an online softmax over paged K/V tiles, and attn_combine merges the splits.
Legend: N query rows, Hq/Hkv query/kv heads, G = Hq/Hkv, D head dim, P page size, S splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels.attn_combine import attn_combine

__all__ = ["gqa_decode", "reference_gqa_decode"]


@triton.jit
def _kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pt_ptr,
    limit_ptr,
    seq_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    scale,
    G,
    D,
    page_size,
    max_keys,
    split_len,
    stride_qn,
    stride_qh,
    stride_ks,
    stride_kp,
    stride_kh,
    stride_vs,
    stride_vp,
    stride_vh,
    stride_pt,
    stride_an,
    stride_ah,
    stride_as,
    stride_mn,
    stride_mh,
    HAS_SEQ: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    b = n
    if HAS_SEQ:
        b = tl.load(seq_ptr + n).to(tl.int64)
    limit = tl.minimum(tl.load(limit_ptr + n), max_keys)  # never past the page table
    g = tl.arange(0, BLOCK_G)  # [BG] query heads of this kv head
    gmask = g < G
    heads = kvh * G + g  # [BG]
    d = tl.arange(0, BLOCK_D)  # [BD]
    dmask = d < D
    q = tl.load(
        q_ptr + n * stride_qn + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )  # [BG, BD]
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], -1e30, dtype=tl.float32)  # EMPTY_MAX
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    start = sp * split_len
    end = tl.minimum(start + split_len, limit)
    for p0 in range(start, end, BLOCK_N):
        pos = p0 + tl.arange(0, BLOCK_N)  # [BN] token positions
        pmask = pos < end
        slot = tl.load(pt_ptr + b * stride_pt + pos // page_size, mask=pmask, other=0).to(tl.int64)
        off = pos % page_size
        kv_mask = pmask[:, None] & dmask[None, :]
        k = tl.load(
            k_ptr + (slot * stride_ks + off * stride_kp + kvh * stride_kh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BN, BD]
        v = tl.load(
            v_ptr + (slot * stride_vs + off * stride_vp + kvh * stride_vh)[:, None] + d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BN, BD]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # [BG, BN] fp32
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [BG, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    row_mask = gmask[:, None] & dmask[None, :]
    a_ptrs = acc_ptr + n * stride_an + heads[:, None] * stride_ah + sp * stride_as + d[None, :]
    tl.store(a_ptrs, acc, mask=row_mask)
    tl.store(m_ptr + n * stride_mn + heads * stride_mh + sp, m_i, mask=gmask)
    tl.store(l_ptr + n * stride_mn + heads * stride_mh + sp, l_i, mask=gmask)


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    row_limit: torch.Tensor,
    row_seq: torch.Tensor | None,
) -> None:
    assert q.dim() == 3, f"q must be [N, Hq, D], got {tuple(q.shape)}"
    assert k_cache.dim() == 4, f"k_cache must be [slots, page_size, Hkv, D], got {k_cache.shape}"
    assert v_cache.shape == k_cache.shape, (v_cache.shape, k_cache.shape)
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    assert k_cache.shape[3] == D, (k_cache.shape, q.shape)
    assert Hq % Hkv == 0, f"num_heads {Hq} must be a multiple of num_kv_heads {Hkv}"
    assert q.stride(-1) == 1 and k_cache[0].is_contiguous() and v_cache[0].is_contiguous()
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert page_table.dim() == 2 and page_table.dtype == torch.int32, page_table.dtype
    assert page_table.stride(-1) == 1
    assert row_limit.shape == (N,) and row_limit.dtype == torch.int32, row_limit.dtype
    if row_seq is None:
        assert page_table.shape[0] == N, "without row_seq, row n reads page_table[n]"
    else:
        assert row_seq.shape == (N,) and row_seq.dtype == torch.int32, row_seq.dtype
    for t in (k_cache, v_cache, page_table, row_limit) + (
        (row_seq,) if row_seq is not None else ()
    ):
        assert t.device == q.device


def gqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    row_limit: torch.Tensor,
    *,
    scale: float,
    row_seq: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Paged GQA attention. q [N, Hq, D]; k_cache/v_cache [slots, P, Hkv, D];
    page_table int32 [B, max_pages]; row_limit int32 [N] (keys [0, limit) visible);
    row_seq int32 [N] (page_table row of each query row; default n). Returns [N, Hq, D], q.dtype.
    """
    _check(q, k_cache, v_cache, page_table, row_limit, row_seq)
    N, Hq, D = q.shape
    P, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    max_keys = page_table.shape[1] * P  # upper bound on any row's limit (no host sync)
    block_n = 64 if backend.gpu_sized(q.device) else 32  # interpreter: fewer, larger steps
    if num_splits is None:
        num_splits = backend.num_splits(q.device, N * Hkv, max_keys, 4 * block_n)
    split_len = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    acc = torch.empty((N, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    m = torch.empty((N, Hq, num_splits), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    if N == 0:
        return torch.empty_like(q)
    backend.launch(
        _kernel,
        (N, Hkv, num_splits),
        q.device,
        q,
        k_cache,
        v_cache,
        page_table,
        row_limit,
        row_seq if row_seq is not None else row_limit,
        acc,
        m,
        lsum,
        float(scale),
        G,
        D,
        P,
        max_keys,
        split_len,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        page_table.stride(0),
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        m.stride(0),
        m.stride(1),
        HAS_SEQ=row_seq is not None,
        DOT_FP32=backend.on_interpreter(q.device),
        DOT_PREC=backend.dot_precision(q.dtype),
        BLOCK_G=max(triton.next_power_of_2(G), 16),
        BLOCK_D=max(triton.next_power_of_2(D), 16),
        BLOCK_N=block_n,
    )
    return attn_combine(acc, m, lsum, q.dtype)


def _gather_rows(
    cache: torch.Tensor, page_table: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """cache [slots, P, ...], seq [N], pos [N, L] (valid positions) -> [N, L, ...]."""
    P = cache.shape[1]
    slots = page_table.long()[seq.long()[:, None], pos // P]  # [N, L]
    return cache[slots, pos % P]


def reference_gqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    row_limit: torch.Tensor,
    *,
    scale: float,
    row_seq: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain torch, fp32 math, dense over gathered pages (same signature as gqa_decode;
    num_splits is ignored). Rows with row_limit 0 give 0."""
    _check(q, k_cache, v_cache, page_table, row_limit, row_seq)
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    seq = row_seq if row_seq is not None else torch.arange(N, device=q.device)
    limit = row_limit.long().clamp(max=page_table.shape[1] * k_cache.shape[1])  # [N]
    L = max(int(limit.max()), 1) if N > 0 else 1
    pos = torch.arange(L, device=q.device).expand(N, L)  # [N, L]
    valid = pos < limit[:, None]  # [N, L]
    pos = torch.where(valid, pos, 0)
    keep = valid[:, :, None, None]
    k = torch.where(keep, _gather_rows(k_cache, page_table, seq, pos).float(), 0.0)  # [N,L,Hkv,D]
    v = torch.where(keep, _gather_rows(v_cache, page_table, seq, pos).float(), 0.0)
    k = k.repeat_interleave(Hq // Hkv, dim=2)  # [N, L, Hq, D], repeat_kv
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("nhd,nlhd->nhl", q.float(), k) * scale  # [N, Hq, L]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    return torch.einsum("nhl,nlhd->nhd", p, v).to(q.dtype)
