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

from runtime.models.glm_moe_dsa import NORM_EPS
from runtime.models.layers import linear, rms_norm
from runtime.models.rope import rope_interleaved, rope_neox_partial


def causal_by_position(pos: torch.Tensor, c: int) -> torch.Tensor:
    """[n, c] bool: the query at position pos[i] may attend to positions <= pos[i]."""
    return torch.arange(c, device=pos.device)[None, :] <= pos[:, None]


# --- glm_moe_dsa: MLA + DSA --------------------------------------------------------------------


def mla_project(attn, x: torch.Tensor, cos, sin):
    """-> (query dict, new plane rows {"latent": [n, Kl+R], "index_k": [n, Di] (full layers)})."""
    cfg = attn.cfg
    t = x.shape[0]
    nh, nd, r, kl = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q_resid = rms_norm(linear(x, attn.q_a, attn.q_a_bias), attn.q_a_norm, NORM_EPS)
    q = linear(q_resid, attn.q_b).view(t, nh, nd + r)
    q_nope, q_rope = q[..., :nd], rope_interleaved(q[..., nd:], cos, sin)
    ckv = linear(x, attn.kv_a, attn.kv_a_bias)
    latent = rms_norm(ckv[:, :kl], attn.kv_a_norm, NORM_EPS)
    k_rot = rope_interleaved(ckv[:, kl:], cos, sin)
    rows = {"latent": torch.cat([latent, k_rot], dim=-1)}
    qry = {}
    ix = attn.indexer
    if ix is not None:
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        iq = linear(q_resid, ix.wq_b).view(t, hi, di)
        qry["idx_q"] = torch.cat([rope_interleaved(iq[..., :r], cos, sin), iq[..., r:]], dim=-1)
        k = F.layer_norm(linear(x, ix.wk), (di,), ix.k_norm_w, ix.k_norm_b, NORM_EPS)
        rows["index_k"] = torch.cat([rope_interleaved(k[:, :r], cos, sin), k[:, r:]], dim=-1)
        qry["idx_w"] = linear(x.to(ix.weights_proj.dtype), ix.weights_proj).float() * (hi**-0.5)
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
    """-> (query dict, new plane rows {"k": [n, Hk, Dh], "v": [n, Hk, Dh]})."""
    cfg = attn.cfg
    t, h, hk, dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, attn.wq, attn.bq).view(t, h, dh)
    k = linear(x, attn.wk, attn.bk).view(t, hk, dh)
    v = linear(x, attn.wv, attn.bv).view(t, hk, dh)
    if attn.q_norm is not None:
        q = rms_norm(q, attn.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, attn.k_norm, cfg.rms_norm_eps)
    q, k = rope_neox_partial(q, cos, sin), rope_neox_partial(k, cos, sin)
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
