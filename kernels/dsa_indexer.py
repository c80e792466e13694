"""DeepSeek Sparse Attention indexer: score cached keys per query token, pick the top-k.

For query token t (of sequence ``token_seq[t]``) and a cached indexer key k[s] of that sequence
(the paged plane ``[num_slots, page_size, Di]``, already k_norm'd and RoPE'd)::

    score[t, s] = sum_h w[t, h] * relu(scale * q[t, h] . k[s])     for s < token_limit[t]
    score[t, s] = -inf                                               otherwise

in fp32, as transformers' ``GlmMoeDsaIndexer`` (q.float() @ k.float(), relu, weighted head sum;
``w`` already includes ``weights_proj(x) * Hi**-0.5``, ``scale = Di**-0.5``). ``token_limit[t]``
is the causal limit (position + 1; ``seq_lens`` for decode). The Triton kernel computes the
scores; top-k is ``torch.topk`` in the wrapper.

Top-k differs from transformers' in one way: transformers takes ``min(index_topk, total_len)``
indices and may include masked (-inf) positions, which its attention mask removes again; here
such entries are -1 (= unused, the contract of mla_decode's ``topk_idx``). Ties (many scores
exactly 0 with few heads) break arbitrarily in both.
Legend: T query tokens, Hi indexer heads, Di index head dim, S key positions, P page size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend

__all__ = [
    "dsa_indexer_scores",
    "dsa_indexer_topk",
    "reference_dsa_indexer_scores",
    "reference_dsa_indexer_topk",
]


@triton.jit
def _kernel(
    q_ptr,
    w_ptr,
    k_ptr,
    pt_ptr,
    seq_ptr,
    limit_ptr,
    out_ptr,
    scale,
    HI,
    DI,
    page_size,
    max_pos,
    stride_qt,
    stride_qh,
    stride_wt,
    stride_ks,
    stride_kp,
    stride_pt,
    stride_ot,
    S,
    DOT_FP32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] key positions
    b = tl.load(seq_ptr + t).to(tl.int64)
    limit = tl.minimum(tl.load(limit_ptr + t), max_pos)  # never past the page table
    valid = pos < limit
    h = tl.arange(0, BLOCK_H)  # [BH]
    hmask = h < HI
    d = tl.arange(0, BLOCK_D)  # [BD]
    dmask = d < DI
    out = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    if tl.program_id(1) * BLOCK_N < limit:  # blocks past the causal limit are all -inf
        q = tl.load(
            q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :],
            mask=hmask[:, None] & dmask[None, :],
            other=0.0,
        )  # [BH, BD]
        w = tl.load(w_ptr + t * stride_wt + h, mask=hmask, other=0.0).to(tl.float32)  # [BH]
        pos_c = tl.where(valid, pos, 0)
        slot = tl.load(pt_ptr + b * stride_pt + pos_c // page_size, mask=valid, other=0)
        row = slot.to(tl.int64) * stride_ks + (pos_c % page_size).to(tl.int64) * stride_kp
        k = tl.load(
            k_ptr + row[:, None] + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0
        )  # [BN, BD]
        if DOT_FP32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale  # [BH, BN] fp32
        s = tl.maximum(s, 0.0)  # relu
        score = tl.sum(s * w[:, None], axis=0)  # [BN]
        out = tl.where(valid, score, out)
    tl.store(out_ptr + t * stride_ot + pos, out, mask=pos < S)


def _check(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    page_table: torch.Tensor,
    token_seq: torch.Tensor,
    token_limit: torch.Tensor,
) -> None:
    assert q.dim() == 3, f"q must be [T, Hi, Di], got {tuple(q.shape)}"
    T, Hi, Di = q.shape
    assert weights.shape == (T, Hi), (weights.shape, q.shape)
    assert k_cache.dim() == 3 and k_cache.shape[2] == Di, (k_cache.shape, Di)
    assert k_cache[0].is_contiguous(), "the key plane must be contiguous past the slot dim"
    assert q.dtype == k_cache.dtype, (q.dtype, k_cache.dtype)
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert q.stride(-1) == 1 and weights.stride(-1) == 1
    assert page_table.dim() == 2 and page_table.dtype == torch.int32 and page_table.stride(-1) == 1
    assert token_seq.shape == (T,) and token_seq.dtype == torch.int32, token_seq.dtype
    assert token_limit.shape == (T,) and token_limit.dtype == torch.int32, token_limit.dtype
    for t in (weights, k_cache, page_table, token_seq, token_limit):
        assert t.device == q.device


def _max_len(token_limit: torch.Tensor, max_len: int | None) -> int:
    if max_len is None:  # host sync; pass max_len to avoid it
        max_len = int(token_limit.max()) if token_limit.numel() else 0
    return max_len


def dsa_indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    page_table: torch.Tensor,
    token_seq: torch.Tensor,
    token_limit: torch.Tensor,
    *,
    scale: float,
    max_len: int | None = None,
) -> torch.Tensor:
    """Index scores fp32 [T, max_len]. q [T, Hi, Di]; weights [T, Hi] (with Hi**-0.5 folded in);
    k_cache [slots, P, Di]; page_table int32 [B, max_pages]; token_seq int32 [T] (page_table row);
    token_limit int32 [T] (keys [0, limit) visible); max_len >= max(token_limit) (default: that
    max, a host sync). Positions >= token_limit[t] are -inf."""
    _check(q, weights, k_cache, page_table, token_seq, token_limit)
    T, Hi, Di = q.shape
    S = _max_len(token_limit, max_len)
    out = torch.empty((T, S), dtype=torch.float32, device=q.device)
    if T == 0 or S == 0:
        return out
    block_n = 64 if backend.gpu_sized(q.device) else 32
    backend.launch(
        _kernel,
        (T, triton.cdiv(S, block_n)),
        q.device,
        q,
        weights,
        k_cache,
        page_table,
        token_seq,
        token_limit,
        out,
        float(scale),
        Hi,
        Di,
        k_cache.shape[1],
        page_table.shape[1] * k_cache.shape[1],
        q.stride(0),
        q.stride(1),
        weights.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        page_table.stride(0),
        out.stride(0),
        S,
        DOT_FP32=backend.on_interpreter(q.device),
        DOT_PREC=backend.dot_precision(q.dtype),
        BLOCK_H=max(triton.next_power_of_2(Hi), 16),
        BLOCK_D=max(triton.next_power_of_2(Di), 16),
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def _topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    k = min(topk, scores.shape[1])
    vals, idx = scores.topk(k, dim=-1)  # [T, k]
    return torch.where(vals == float("-inf"), -1, idx).to(torch.int32)


def dsa_indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    page_table: torch.Tensor,
    token_seq: torch.Tensor,
    token_limit: torch.Tensor,
    *,
    scale: float,
    topk: int,
    max_len: int | None = None,
) -> torch.Tensor:
    """Selected positions int32 [T, min(topk, max_len)], best first, -1 where fewer than that
    many positions are visible. Arguments as dsa_indexer_scores."""
    scores = dsa_indexer_scores(
        q, weights, k_cache, page_table, token_seq, token_limit, scale=scale, max_len=max_len
    )
    return _topk(scores, topk)


def reference_dsa_indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    page_table: torch.Tensor,
    token_seq: torch.Tensor,
    token_limit: torch.Tensor,
    *,
    scale: float,
    max_len: int | None = None,
) -> torch.Tensor:
    """Plain torch, transformers' op order (same signature as dsa_indexer_scores)."""
    _check(q, weights, k_cache, page_table, token_seq, token_limit)
    T = q.shape[0]
    S = _max_len(token_limit, max_len)
    P = k_cache.shape[1]
    pos = torch.arange(S, device=q.device).expand(T, S)  # [T, S]
    limit = token_limit.long().clamp(max=page_table.shape[1] * P)  # [T]
    valid = pos < limit[:, None]  # [T, S]
    pos = torch.where(valid, pos, 0)
    slots = page_table.long()[token_seq.long()[:, None], pos // P]  # [T, S]
    k = torch.where(valid[..., None], k_cache[slots, pos % P].float(), 0.0)  # [T, S, Di]
    s = torch.relu(torch.einsum("thd,tsd->ths", q.float(), k) * scale)  # [T, Hi, S]
    score = torch.einsum("th,ths->ts", weights.float(), s)  # [T, S]
    return score.masked_fill(~valid, float("-inf"))


def reference_dsa_indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    k_cache: torch.Tensor,
    page_table: torch.Tensor,
    token_seq: torch.Tensor,
    token_limit: torch.Tensor,
    *,
    scale: float,
    topk: int,
    max_len: int | None = None,
) -> torch.Tensor:
    """Plain torch (same signature as dsa_indexer_topk)."""
    scores = reference_dsa_indexer_scores(
        q, weights, k_cache, page_table, token_seq, token_limit, scale=scale, max_len=max_len
    )
    return _topk(scores, topk)
