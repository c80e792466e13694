"""Paged sparse MLA attention (GLM-5 / DeepSeek Sparse Attention) in the absorbed form.

kv_b_proj's weight [H * (qk_nope + v_head), kv_lora] splits per head into
``w_uk [H, qk_nope, kv_lora]`` and ``w_uv [H, v_head, kv_lora]`` (``split_kv_b``). Then for query
row n, head h, with the latent plane rows ``c[s] = latent[s, :kv_lora]`` and
``r[s] = latent[s, kv_lora:]`` (RoPE'd k_rot)::

    q_lat = q_nope @ w_uk                                  # [N, H, kv_lora]
    score[s] = (q_lat . c[s] + q_rope . r[s]) * scale      # s over the row's selected positions
    out_lat = sum_s softmax(score)[s] * c[s]               # [N, H, kv_lora]
    out = out_lat @ w_uv^T                                 # [N, H, v_head]

which equals transformers' dense form (k_nope = w_uk c, v = w_uv c, masked to the DSA top-k).
Only the positions in ``topk_idx[n]`` are read (-1 = unused slot; positions >= row_limit[n] are
ignored too when row_limit is given, and so are positions past the page table). A selected
position below the limit must hold a token (< seq_len): its page is read as is. Each query row
has its own selection, so the same kernel serves decode (N = B rows, row_seq = arange) and
prefill chunks (N = T tokens, row_seq = their sequence, row_limit = position + 1).

The absorption and the output projection are torch bmm's in the wrapper; the Triton kernel does
the paged gather, online softmax and weighted sum, split over the selection (flash-decoding),
and attn_combine merges the splits.
Legend: N query rows, H heads, K selected positions per row, L kv_lora, R rope dim, P page size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels.attn_combine import attn_combine

__all__ = [
    "mla_decode",
    "mla_sparse_attention",
    "split_kv_b",
    "reference_mla_decode",
    "reference_mla_sparse_attention",
]


@triton.jit
def _kernel(
    ql_ptr,
    qr_ptr,
    lat_ptr,
    pt_ptr,
    idx_ptr,
    seq_ptr,
    limit_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    scale,
    H,
    K,
    LORA,
    ROPE,
    page_size,
    max_pos,
    split_len,
    stride_qln,
    stride_qlh,
    stride_qrn,
    stride_qrh,
    stride_ls,
    stride_lp,
    stride_pt,
    stride_idx,
    stride_an,
    stride_ah,
    stride_as,
    stride_mn,
    stride_mh,
    HAS_SEQ: tl.constexpr,
    HAS_LIMIT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    sp = tl.program_id(2)
    hmask = heads < H
    b = n
    if HAS_SEQ:
        b = tl.load(seq_ptr + n).to(tl.int64)
    limit = max_pos  # positions past the page table are never read
    if HAS_LIMIT:
        limit = tl.minimum(tl.load(limit_ptr + n), max_pos)
    cl = tl.arange(0, BLOCK_L)  # [BL] latent dims
    lmask = cl < LORA
    cr = tl.arange(0, BLOCK_R)  # [BR] rope dims
    rmask = cr < ROPE
    q_lat = tl.load(
        ql_ptr + n * stride_qln + heads[:, None] * stride_qlh + cl[None, :],
        mask=hmask[:, None] & lmask[None, :],
        other=0.0,
    )  # [BH, BL]
    q_rope = tl.load(
        qr_ptr + n * stride_qrn + heads[:, None] * stride_qrh + cr[None, :],
        mask=hmask[:, None] & rmask[None, :],
        other=0.0,
    )  # [BH, BR]
    if DOT_FP32:
        q_lat = q_lat.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    m_i = tl.full([BLOCK_H], -1e30, dtype=tl.float32)  # attn_combine.EMPTY_MAX
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    start = sp * split_len
    end = tl.minimum(start + split_len, K)
    for k0 in range(start, end, BLOCK_N):
        kk = k0 + tl.arange(0, BLOCK_N)  # [BN] index into the selection
        pos = tl.load(idx_ptr + n * stride_idx + kk, mask=kk < end, other=-1)  # [BN] positions
        valid = (pos >= 0) & (pos < limit)
        pos = tl.where(valid, pos, 0)
        slot = tl.load(pt_ptr + b * stride_pt + pos // page_size, mask=valid, other=0)
        row = slot.to(tl.int64) * stride_ls + (pos % page_size).to(tl.int64) * stride_lp  # [BN]
        c = tl.load(
            lat_ptr + row[:, None] + cl[None, :], mask=valid[:, None] & lmask[None, :], other=0.0
        )  # [BN, BL] latent rows
        r = tl.load(
            lat_ptr + row[:, None] + LORA + cr[None, :],
            mask=valid[:, None] & rmask[None, :],
            other=0.0,
        )  # [BN, BR] k_rot rows
        if DOT_FP32:
            c = c.to(tl.float32)
            r = r.to(tl.float32)
        s = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PREC) + tl.dot(
            q_rope, tl.trans(r), input_precision=DOT_PREC
        )  # [BH, BN] fp32
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PREC)  # [BH, BL]
        m_i = m_new
    a_ptrs = acc_ptr + n * stride_an + heads[:, None] * stride_ah + sp * stride_as + cl[None, :]
    tl.store(a_ptrs, acc, mask=hmask[:, None] & lmask[None, :])
    tl.store(m_ptr + n * stride_mn + heads * stride_mh + sp, m_i, mask=hmask)
    tl.store(l_ptr + n * stride_mn + heads * stride_mh + sp, l_i, mask=hmask)


def split_kv_b(
    kv_b_weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight [H * (qk_nope + v_head), kv_lora] -> (w_uk [H, qk_nope, kv_lora],
    w_uv [H, v_head, kv_lora]), views in transformers' per-head (k_nope, value) order."""
    kv_lora = kv_b_weight.shape[1]
    assert kv_b_weight.shape[0] == num_heads * (qk_nope_head_dim + v_head_dim), kv_b_weight.shape
    w = kv_b_weight.view(num_heads, qk_nope_head_dim + v_head_dim, kv_lora)
    return w[:, :qk_nope_head_dim], w[:, qk_nope_head_dim:]


def _check_sparse(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    page_table: torch.Tensor,
    topk_idx: torch.Tensor,
    row_seq: torch.Tensor | None,
    row_limit: torch.Tensor | None,
) -> None:
    assert q_lat.dim() == 3 and q_rope.dim() == 3, (q_lat.shape, q_rope.shape)
    N, H, L = q_lat.shape
    R = q_rope.shape[2]
    assert q_rope.shape[:2] == (N, H), (q_rope.shape, q_lat.shape)
    assert latent.dim() == 3 and latent.shape[2] == L + R, (latent.shape, L, R)
    assert latent[0].is_contiguous(), "the latent plane must be contiguous past the slot dim"
    assert q_lat.stride(-1) == 1 and q_rope.stride(-1) == 1
    assert q_lat.dtype in (torch.float32, torch.float16, torch.bfloat16), q_lat.dtype
    assert q_rope.dtype == q_lat.dtype == latent.dtype, (q_lat.dtype, q_rope.dtype, latent.dtype)
    assert page_table.dim() == 2 and page_table.dtype == torch.int32 and page_table.stride(-1) == 1
    assert topk_idx.dim() == 2 and topk_idx.shape[0] == N, (topk_idx.shape, N)
    assert topk_idx.dtype == torch.int32 and topk_idx.stride(-1) == 1, topk_idx.dtype
    if row_seq is None:
        assert page_table.shape[0] == N, "without row_seq, row n reads page_table[n]"
    else:
        assert row_seq.shape == (N,) and row_seq.dtype == torch.int32, row_seq.dtype
    if row_limit is not None:
        assert row_limit.shape == (N,) and row_limit.dtype == torch.int32, row_limit.dtype
    for t in (q_rope, latent, page_table, topk_idx, row_seq, row_limit):
        assert t is None or t.device == q_lat.device


def mla_sparse_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    page_table: torch.Tensor,
    topk_idx: torch.Tensor,
    *,
    scale: float,
    row_seq: torch.Tensor | None = None,
    row_limit: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The Triton part: q_lat [N, H, L], q_rope [N, H, R], latent plane [slots, P, L + R],
    page_table int32 [B, max_pages], topk_idx int32 [N, K] (-1 = unused), row_seq int32 [N]
    (default n), row_limit int32 [N] (optional). Returns out_lat fp32 [N, H, L]."""
    _check_sparse(q_lat, q_rope, latent, page_table, topk_idx, row_seq, row_limit)
    N, H, L = q_lat.shape
    R = q_rope.shape[2]
    K = topk_idx.shape[1]
    on_cuda = backend.gpu_sized(q_lat.device)
    block_h = 16  # tl.dot needs >= 16 rows; pad the heads
    block_n = 32 if on_cuda else 16
    head_blocks = triton.cdiv(H, block_h)
    if num_splits is None:
        num_splits = backend.num_splits(q_lat.device, N * head_blocks, K, 4 * block_n)
    split_len = triton.cdiv(triton.cdiv(max(K, 1), num_splits), block_n) * block_n
    acc = torch.empty((N, H, num_splits, L), dtype=torch.float32, device=q_lat.device)
    m = torch.empty((N, H, num_splits), dtype=torch.float32, device=q_lat.device)
    lsum = torch.empty_like(m)
    if N == 0:
        return torch.empty((0, H, L), dtype=torch.float32, device=q_lat.device)
    backend.launch(
        _kernel,
        (N, head_blocks, num_splits),
        q_lat.device,
        q_lat,
        q_rope,
        latent,
        page_table,
        topk_idx,
        row_seq if row_seq is not None else topk_idx,
        row_limit if row_limit is not None else topk_idx,
        acc,
        m,
        lsum,
        float(scale),
        H,
        K,
        L,
        R,
        latent.shape[1],
        page_table.shape[1] * latent.shape[1],
        split_len,
        q_lat.stride(0),
        q_lat.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        latent.stride(0),
        latent.stride(1),
        page_table.stride(0),
        topk_idx.stride(0),
        acc.stride(0),
        acc.stride(1),
        acc.stride(2),
        m.stride(0),
        m.stride(1),
        HAS_SEQ=row_seq is not None,
        HAS_LIMIT=row_limit is not None,
        DOT_FP32=backend.on_interpreter(q_lat.device),
        DOT_PREC=backend.dot_precision(q_lat.dtype),
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_L=max(triton.next_power_of_2(L), 16),
        BLOCK_R=max(triton.next_power_of_2(R), 16),
        num_warps=8 if L >= 256 else 4,
    )
    return attn_combine(acc, m, lsum, torch.float32)


def _absorb(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [N, H, dn] @ w_uk [H, dn, L] -> q_lat [N, H, L] (bmm over heads)."""
    return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)


def _project_out(out_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """out_lat [N, H, L] @ w_uv^T ([H, L, dv]) -> [N, H, dv] (contiguous)."""
    return torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1).contiguous()


def _check_proj(q_nope, q_rope, w_uk, w_uv) -> None:
    assert q_nope.dim() == 3 and q_nope.shape[:2] == q_rope.shape[:2], (q_nope.shape, q_rope.shape)
    H, dn = q_nope.shape[1], q_nope.shape[2]
    assert w_uk.dim() == 3 and w_uk.shape[:2] == (H, dn), (w_uk.shape, q_nope.shape)
    assert w_uv.dim() == 3 and w_uv.shape[0] == H and w_uv.shape[2] == w_uk.shape[2], w_uv.shape
    assert q_nope.dtype == q_rope.dtype == w_uk.dtype == w_uv.dtype, "one dtype for q and w"


def mla_decode(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    page_table: torch.Tensor,
    topk_idx: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    *,
    scale: float,
    row_seq: torch.Tensor | None = None,
    row_limit: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed sparse MLA. q_nope [N, H, qk_nope], q_rope [N, H, R] (RoPE'd), latent plane
    [slots, P, L + R], page_table int32 [B, max_pages], topk_idx int32 [N, K] (-1 = unused),
    w_uk [H, qk_nope, L], w_uv [H, v_head, L]; row_seq/row_limit as in mla_sparse_attention.
    Returns [N, H, v_head] in q's dtype."""
    _check_proj(q_nope, q_rope, w_uk, w_uv)
    q_lat = _absorb(q_nope, w_uk)  # [N, H, L], q's dtype
    out_lat = mla_sparse_attention(
        q_lat,
        q_rope,
        latent,
        page_table,
        topk_idx,
        scale=scale,
        row_seq=row_seq,
        row_limit=row_limit,
        num_splits=num_splits,
    )  # [N, H, L] fp32
    return _project_out(out_lat.to(w_uv.dtype), w_uv)


def reference_mla_sparse_attention(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    page_table: torch.Tensor,
    topk_idx: torch.Tensor,
    *,
    scale: float,
    row_seq: torch.Tensor | None = None,
    row_limit: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain torch, fp32 (same signature as mla_sparse_attention; num_splits ignored).
    Rows with no valid selected position give 0."""
    _check_sparse(q_lat, q_rope, latent, page_table, topk_idx, row_seq, row_limit)
    N, H, L = q_lat.shape
    P = latent.shape[1]
    seq = row_seq.long() if row_seq is not None else torch.arange(N, device=q_lat.device)
    pos = topk_idx.long()  # [N, K]
    valid = (pos >= 0) & (pos < page_table.shape[1] * P)
    if row_limit is not None:
        valid &= pos < row_limit.long()[:, None]
    pos = torch.where(valid, pos, 0)
    slots = page_table.long()[seq[:, None], pos // P]  # [N, K]
    rows = torch.where(valid[..., None], latent[slots, pos % P].float(), 0.0)  # [N, K, L + R]
    c, r = rows[..., :L], rows[..., L:]  # [N, K, L], [N, K, R]
    s = torch.einsum("nhl,nkl->nhk", q_lat.float(), c)
    s = (s + torch.einsum("nhr,nkr->nhk", q_rope.float(), r)) * scale  # [N, H, K]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    return torch.einsum("nhk,nkl->nhl", p, c)  # [N, H, L] fp32


def reference_mla_decode(
    q_nope: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    page_table: torch.Tensor,
    topk_idx: torch.Tensor,
    w_uk: torch.Tensor,
    w_uv: torch.Tensor,
    *,
    scale: float,
    row_seq: torch.Tensor | None = None,
    row_limit: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain torch absorbed MLA (same signature as mla_decode; same bmm's around an fp32 core)."""
    _check_proj(q_nope, q_rope, w_uk, w_uv)
    q_lat = _absorb(q_nope, w_uk)
    out_lat = reference_mla_sparse_attention(
        q_lat,
        q_rope,
        latent,
        page_table,
        topk_idx,
        scale=scale,
        row_seq=row_seq,
        row_limit=row_limit,
    )
    return _project_out(out_lat.to(w_uv.dtype), w_uv)
