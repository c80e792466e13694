"""Attention for query tokens at explicit positions over a full context (context-parallel).

Under LayerSplit a rank's queries are interleaved (token t on rank t % N) and the context comes
from the owner's broadcast of the layer's planes, not from this rank's pool; so the causal mask
is built from each query's position. Everything else is the model's own: the attention blocks'
public ``project`` / ``indexer_project`` / ``output`` (runtime/models/glm_moe_dsa.py,
glm4_moe.py) through torch ops, and the dense attention math of runtime/models/attention_math.py
that the eager step uses too. Projections and attention are separate calls here because the
rank exchanges the new rows (and waits for broadcasts) between them.

Legend: n query tokens on this rank, c context length, H heads, Kl kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import torch

from runtime.models import attention_math as am
from runtime.models.steps import TorchOps


def project(attn, x: torch.Tensor, ops: TorchOps) -> tuple[dict, dict]:
    """-> (queries, new plane rows) of n tokens: {"latent", "index_k" (full layers)} for MLA,
    {"k", "v"} for GQA."""
    if hasattr(attn, "w_uk"):  # MLA
        q_resid, q_nope, q_rope, new_lat = attn.project(x, ops)
        rows, qry = {"latent": new_lat}, {}
        if attn.indexer is not None:
            qry["idx_q"], rows["index_k"], qry["idx_w"] = attn.indexer_project(x, q_resid, ops)
        qry["q_abs"] = am.absorb_queries(q_nope, q_rope, attn.w_uk)  # [H, n, Kl+R]
        return qry, rows
    q, k, v = attn.project(x, ops)
    return {"q": q}, {"k": k, "v": v}


def dsa_select(attn, qry: dict, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """DSA top-k positions [n, k] of each query over its causal prefix, or None when the whole
    context fits in index_topk (the selection is then the causal set). keys [c, Di]."""
    cfg, c = attn.cfg, keys.shape[0]
    if c <= cfg.index_topk:
        return None
    allowed = am.causal_mask(pos, c)
    scale = cfg.index_head_dim**-0.5
    return am.dsa_topk(qry["idx_q"], qry["idx_w"], keys, allowed, scale, cfg.index_topk)


def mla_attend(attn, qry: dict, pos: torch.Tensor, kv: torch.Tensor, sel) -> torch.Tensor:
    """Absorbed MLA of the queries over kv [c, Kl+R] (latent plane rows 0..c-1) -> [n, D]."""
    allowed = am.selection_mask(am.causal_mask(pos, kv.shape[0]), sel)
    out = am.mla_attend(qry["q_abs"], kv, allowed, attn.w_uv, attn.scaling)  # [n, H, Vd]
    return attn.output(out.flatten(1))


def gqa_attend(attn, qry: dict, pos: torch.Tensor, keys, vals) -> torch.Tensor:
    """GQA of the queries over keys/vals [c, Hk, Dh] -> [n, D]."""
    out = am.gqa_attend(qry["q"], keys, vals, am.causal_mask(pos, keys.shape[0]))
    return attn.output(out.flatten(1))
