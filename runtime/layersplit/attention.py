"""Attention for query tokens at explicit positions over a full context (context-parallel).

The model's own attention (runtime/models/) assumes a sequence's new tokens are contiguous
positions [start, end). Under LayerSplit a rank's queries are interleaved (token t on rank
t % N), so the causal mask here is built from each query's position. The math is the model's,
op for op: projections, RoPE, absorbed MLA with the DSA top-k over the causal prefix (a shared
layer reuses the last full layer's selection), GQA with grouped heads.

Legend: n query tokens on this rank, c context length, H heads, Kl kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.models.layers import linear


def causal_by_position(pos: torch.Tensor, c: int) -> torch.Tensor:
    """[n, c] bool: the query at position pos[i] may attend to positions <= pos[i]."""
    return torch.arange(c, device=pos.device)[None, :] <= pos[:, None]


# --- glm_moe_dsa: MLA + DSA --------------------------------------------------------------------


def mla_project(attn, x: torch.Tensor, cos, sin):
    """-> (query dict, new plane rows {"latent": [n, Kl+R], "index_k": [n, Di] (full layers)}).
    The projections are the model's own (MLAAttention._project / _indexer_project)."""
    q_resid, q_nope, q_rope, new_lat = attn._project(x, cos, sin)
    rows = {"latent": new_lat}
    qry = {}
    if attn.indexer is not None:
        qry["idx_q"], rows["index_k"], qry["idx_w"] = attn._indexer_project(x, q_resid, cos, sin)
    qry["q_abs"] = torch.cat(
        [torch.bmm(q_nope.transpose(0, 1), attn.w_uk), q_rope.transpose(0, 1)], dim=-1
    )  # [H, n, Kl+R]
    return qry, rows


def dsa_select(attn, qry: dict, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """DSA top-k positions [n, k] of each query over its causal prefix, or None when the whole
    context fits in index_topk (the selection is then the causal set). keys [c, Di]."""
    cfg = attn.cfg
    c = keys.shape[0]
    if c <= cfg.index_topk:
        return None
    scale = cfg.index_head_dim**-0.5
    scores = F.relu(torch.einsum("nhd,cd->nhc", qry["idx_q"].float(), keys.float()) * scale)
    index_scores = torch.einsum("nh,nhc->nc", qry["idx_w"], scores)
    index_scores = index_scores.masked_fill(~causal_by_position(pos, c), float("-inf"))
    return index_scores.topk(cfg.index_topk, dim=-1).indices


def mla_attend(attn, qry: dict, pos: torch.Tensor, kv: torch.Tensor, sel) -> torch.Tensor:
    """Absorbed MLA of the queries over kv [c, Kl+R] (latent plane rows 0..c-1) -> [n, D]."""
    cfg = attn.cfg
    q_abs = qry["q_abs"]
    nh, n, kl = cfg.num_heads, q_abs.shape[1], cfg.kv_lora_rank
    scores = torch.matmul(q_abs, kv.t()).float() * attn.scaling  # [H, n, c]
    allowed = causal_by_position(pos, kv.shape[0])
    if sel is not None:
        allowed &= torch.zeros_like(allowed).scatter_(1, sel, True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).to(kv.dtype)
    o_lat = torch.matmul(probs, kv[:, :kl])  # [H, n, Kl]
    out = torch.bmm(o_lat, attn.w_uv.transpose(1, 2))  # [H, n, Vd]
    out = out.transpose(0, 1).reshape(n, nh * cfg.v_head_dim)
    return linear(out, attn.o_proj, attn.o_bias)


# --- glm4_moe: GQA -----------------------------------------------------------------------------


def gqa_project(attn, x: torch.Tensor, cos, sin):
    """-> (query dict, new plane rows {"k": [n, Hk, Dh], "v": [n, Hk, Dh]}): the model's own
    projections (GQAAttention._project)."""
    q, k, v = attn._project(x, cos, sin)
    return {"q": q}, {"k": k, "v": v}


def gqa_attend(attn, qry: dict, pos: torch.Tensor, keys, vals) -> torch.Tensor:
    """GQA of the queries over keys/vals [c, Hk, Dh] -> [n, D]."""
    cfg = attn.cfg
    q = qry["q"]
    n, h, hk, dh = q.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qs = q.view(n, hk, h // hk, dh)
    scores = torch.einsum("nkgd,ckd->nkgc", qs, keys).float() * dh**-0.5
    allowed = causal_by_position(pos, keys.shape[0])[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(q.dtype)
    out = torch.einsum("nkgc,ckd->nkgd", probs, vals).reshape(n, h * dh)
    return linear(out, attn.wo)
