"""The ops the runtime calls: each runs the Triton kernel or the torch reference.

Choice per call (``kernels.backend.use_triton``): CUDA tensors -> Triton; CPU tensors -> the
reference, or Triton through the interpreter when ``KVSCOPE_TRITON_INTERPRET=1``. Signatures are
those of the Triton wrappers in ``kernels.<op>`` (the references share them); see those modules
and docs/kernels.md. The op modules are imported on first use, so importing this stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from kernels.backend import use_triton

__all__ = [
    "rmsnorm",
    "rope_interleave",
    "rope_neox",
    "page_store",
    "page_gather",
    "page_scatter",
    "page_checksum",
    "dsa_indexer_scores",
    "dsa_indexer_topk",
    "mla_sparse_attention",
    "mla_decode",
    "split_kv_b",
    "gqa_decode",
    "attn_combine",
    "fused_moe",
]


def _impl(module: str, name: str, device: torch.device) -> Any:
    mod = importlib.import_module(f"kernels.{module}")
    return getattr(mod, name if use_triton(device) else f"reference_{name}")


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual); see kernels.rmsnorm."""
    return _impl("rmsnorm", "rmsnorm", x.device)(x, weight, eps, residual)


def rope_interleave(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """GLM-5 interleaved RoPE; see kernels.rope."""
    return _impl("rope", "rope_interleave", x.device)(x, cos, sin, positions)


def rope_neox(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """glm4_moe partial rotate_half RoPE; see kernels.rope."""
    return _impl("rope", "rope_neox", x.device)(x, cos, sin, positions)


def page_store(
    plane: torch.Tensor,
    slot_mapping: torch.Tensor,
    values: torch.Tensor,
    col_offset: int = 0,
) -> None:
    """Write token rows into pages, in place; see kernels.page_store."""
    _impl("page_store", "page_store", plane.device)(plane, slot_mapping, values, col_offset)


def page_gather(
    plane: torch.Tensor,
    slot_ids: torch.Tensor | list[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pages plane[slot_ids] into a contiguous buffer; see kernels.page_copy."""
    return _impl("page_copy", "page_gather", plane.device)(plane, slot_ids, out)


def page_scatter(
    plane: torch.Tensor,
    slot_ids: torch.Tensor | list[int],
    src: torch.Tensor,
) -> None:
    """Buffer pages back into plane[slot_ids], in place; see kernels.page_copy."""
    _impl("page_copy", "page_scatter", plane.device)(plane, slot_ids, src)


def page_checksum(
    plane: torch.Tensor, slot_ids: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """int64 digest per page, identical on both backends; see kernels.page_checksum."""
    return _impl("page_checksum", "page_checksum", plane.device)(plane, slot_ids)


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
    """fp32 index scores [T, max_len]; see kernels.dsa_indexer."""
    fn = _impl("dsa_indexer", "dsa_indexer_scores", q.device)
    return fn(q, weights, k_cache, page_table, token_seq, token_limit, scale=scale, max_len=max_len)


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
    """int32 [T, min(topk, max_len)] selected positions, -1 padded; see kernels.dsa_indexer."""
    fn = _impl("dsa_indexer", "dsa_indexer_topk", q.device)
    return fn(
        q,
        weights,
        k_cache,
        page_table,
        token_seq,
        token_limit,
        scale=scale,
        topk=topk,
        max_len=max_len,
    )


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
    """fp32 out_lat [N, H, kv_lora] over the selected positions; see kernels.mla_decode."""
    fn = _impl("mla_decode", "mla_sparse_attention", q_lat.device)
    return fn(
        q_lat,
        q_rope,
        latent,
        page_table,
        topk_idx,
        scale=scale,
        row_seq=row_seq,
        row_limit=row_limit,
        num_splits=num_splits,
    )


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
    """Absorbed sparse MLA, [N, H, v_head]; see kernels.mla_decode."""
    fn = _impl("mla_decode", "mla_decode", q_nope.device)
    return fn(
        q_nope,
        q_rope,
        latent,
        page_table,
        topk_idx,
        w_uk,
        w_uv,
        scale=scale,
        row_seq=row_seq,
        row_limit=row_limit,
        num_splits=num_splits,
    )


def split_kv_b(
    kv_b_weight: torch.Tensor, num_heads: int, qk_nope_head_dim: int, v_head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight -> (w_uk [H, qk_nope, L], w_uv [H, v_head, L]); see kernels.mla_decode."""
    mod = importlib.import_module("kernels.mla_decode")
    return mod.split_kv_b(kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim)


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
    """Paged GQA attention, [N, Hq, D]; see kernels.gqa_decode."""
    fn = _impl("gqa_decode", "gqa_decode", q.device)
    return fn(
        q,
        k_cache,
        v_cache,
        page_table,
        row_limit,
        scale=scale,
        row_seq=row_seq,
        num_splits=num_splits,
    )


def attn_combine(
    acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Merge split-K attention partials; see kernels.attn_combine."""
    return _impl("attn_combine", "attn_combine", acc.device)(acc, m, l, out_dtype)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts (sorted grouped GEMMs), [T, D]; see kernels.fused_moe."""
    return _impl("fused_moe", "fused_moe", x.device)(x, w_gate_up, w_down, topk_ids, topk_weights)
