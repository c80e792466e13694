"""Attention math over a dense context, in plain torch: the reference every path is held to.

Used by the eager step (runtime/models/steps.py, one sequence at a time over the rows it
gathered from the pool) and by LayerSplit (runtime/layersplit/, over the owner's broadcast of a
layer's planes, with queries at interleaved positions). The Triton kernels (kernels/) and the
compiled CPU decode step (runtime/models/decode_step.py) compute the same functions over page
tables or padded contexts; tests hold them to these.

Legend: n query tokens, c context positions, H heads, Kl kv_lora_rank, R qk_rope_head_dim,
Vd v_head_dim, Hi indexer heads, Di index_head_dim, Hk KV heads, G = H / Hk, Dh head dim.
``allowed`` [n, c] bool says which positions each query may read (causal, and for MLA the DSA
selection); None means every position (a lone last token over its whole context).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(positions: torch.Tensor, c: int) -> torch.Tensor:
    """[n, c] bool: the query at position positions[i] may attend to positions <= positions[i]."""
    return torch.arange(c, device=positions.device)[None, :] <= positions[:, None]


def selection_mask(allowed: torch.Tensor, sel: torch.Tensor | None) -> torch.Tensor:
    """allowed [n, c] restricted to the DSA selection sel [n, k] (None: no restriction)."""
    if sel is None:
        return allowed
    return allowed & torch.zeros_like(allowed).scatter_(1, sel, True)


def absorb_queries(q_nope: torch.Tensor, q_rope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """MLA queries absorbed through kv_b's key part: q_nope [n, H, Nd], q_rope [n, H, R],
    w_uk [H, Nd, Kl] -> q_abs [H, n, Kl + R], scored directly against latent-plane rows."""
    return torch.cat(
        [torch.bmm(q_nope.transpose(0, 1), w_uk), q_rope.transpose(0, 1)], dim=-1
    )  # [H, n, Kl+R]


def mla_attend(
    q_abs: torch.Tensor,
    kv: torch.Tensor,
    allowed: torch.Tensor | None,
    w_uv: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Absorbed MLA of q_abs [H, n, Kl+R] over latent rows kv [c, Kl+R] -> [n, H, Vd]."""
    kl = w_uv.shape[-1]
    scores = torch.matmul(q_abs, kv.t()).float() * scaling  # [H, n, c]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(kv.dtype)
    o_lat = torch.matmul(probs, kv[:, :kl])  # [H, n, Kl]
    return torch.bmm(o_lat, w_uv.transpose(1, 2)).transpose(0, 1)  # [n, H, Vd]


def dsa_topk(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    topk: int,
) -> torch.Tensor:
    """DeepSeek Sparse Attention's indexer: index scores of queries q [n, Hi, Di] (head weights
    w [n, Hi], fp32) against indexer keys [c, Di]; the top-k allowed positions [n, topk]."""
    scores = F.relu(torch.einsum("nhd,cd->nhc", q.float(), keys.float()) * scale)  # [n, Hi, c]
    index_scores = torch.einsum("nh,nhc->nc", w, scores)  # [n, c]
    index_scores = index_scores.masked_fill(~allowed, float("-inf"))
    return index_scores.topk(topk, dim=-1).indices


def gqa_attend(
    q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Grouped-query attention of q [n, H, Dh] over keys / vals [c, Hk, Dh] -> [n, H, Dh]."""
    n, h, dh = q.shape
    hk = keys.shape[1]
    qs = q.view(n, hk, h // hk, dh)
    scores = torch.einsum("nkgd,ckd->nkgc", qs, keys).float() * dh**-0.5  # [n, Hk, G, c]
    probs = scores.masked_fill(~allowed[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("nkgc,ckd->nkgd", probs.to(q.dtype), vals).reshape(n, h, dh)


__all__ = [
    "absorb_queries",
    "causal_mask",
    "dsa_topk",
    "gqa_attend",
    "mla_attend",
    "selection_mask",
]
