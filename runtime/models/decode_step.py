"""A decode step as one pure tensor function (no host sync, no Python branching on data): what
runtime/models/cpu_graph.py hands to torch.compile on CPU.

Shapes: B sequences (one new token each), C context columns (>= every sequence's position + 1,
padded), L layers, D hidden, V vocabulary. Inputs:
- ``input_ids`` int64 [B], ``positions`` int64 [B] (the new token's position p_b);
- ``ctx_rows`` int64 [B, C]: flat L1 pool rows of positions 0..C-1 of each sequence; columns
  >= p_b are padding (any valid row) and are masked;
- ``planes``: name -> the pool's plane tensor viewed as [L, rows, *tail] (read only here).
Column p_b of every gathered context is replaced by the new token's own rows (computed in the
step; they are not in the pool yet): the step never writes the pool. It returns the logits
[B, V] (fp32) and, per plane, the new rows [L, B, *tail] that the caller stores at the tokens'
pool rows (kv/pool.py ``store_rows``) after the step.

Math is the torch path's (runtime/models/glm_moe_dsa.py, glm4_moe.py, layers.py) on a fixed-size
context with masks, so greedy tokens equal the eager path's; tests/runtime/test_cpu_graph.py
holds the two together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from runtime.models.layers import DenseMLP, MoE, linear, rms_norm

if TYPE_CHECKING:
    from runtime.models.base import CausalLM


def gather_context(plane: torch.Tensor, ctx_rows: torch.Tensor, new: torch.Tensor, positions):
    """plane [rows, *tail], ctx_rows [B, C], new [B, *tail], positions [B] -> [B, C, *tail]
    with column p_b holding the new token's row.

    Written as a gather followed by a scatter of the new rows (not a `where`): compiled, the
    scatter makes Inductor write the gathered context into one buffer that the attention reads
    with plain vector loads, instead of re-evaluating the indirect gather inside every
    attention loop (measured 10x slower at B = 8)."""
    ctx = plane[ctx_rows]  # [B, C, *tail]
    b = ctx_rows.shape[0]
    return ctx.index_put((torch.arange(b, device=ctx.device), positions), new.to(ctx.dtype))


def moe_decode(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE for a few tokens without host syncs: each token's selected experts are applied
    through gathered weights (fused multiply + sum when compiled); or, once B*K >= 4E (the
    gathers would read each expert several times over), every expert runs on every token and
    the routing weights (zero for unselected experts) combine them."""
    weights, ids = moe.router(x)  # [B, K] fp32, [B, K]
    gu_all, dn_all = moe.experts.stacked()  # [E, 2I, D], [E, D, I]
    b, k = ids.shape
    e, i2 = gu_all.shape[0], gu_all.shape[1]
    if b * k < 4 * e:
        # Written as multiply + sum rather than bmm over gu_all[flat]: compiled, the expert
        # gather fuses into the reduction loop, so the selected weights are read in place
        # instead of being copied into a [B*K, 2I, D] temporary every step.
        flat = ids.reshape(-1)  # [B*K]
        xs = x.repeat_interleave(k, dim=0)  # [B*K, D]
        gu = (xs[:, None, :] * gu_all[flat]).sum(-1)  # [B*K, 2I]
        act = F.silu(gu[:, : i2 // 2]) * gu[:, i2 // 2 :]  # [B*K, I]
        out = (act[:, None, :] * dn_all[flat]).sum(-1)  # [B*K, D]
        out = (out * weights.reshape(-1, 1)).to(x.dtype)  # fp32 weights as the reference
        y = out.view(b, k, -1).sum(dim=1)
    else:
        gu = torch.einsum("bd,efd->ebf", x, gu_all)  # [E, B, 2I]
        act = F.silu(gu[..., : i2 // 2]) * gu[..., i2 // 2 :]
        out = torch.bmm(act, dn_all.transpose(1, 2))  # [E, B, D]
        dense_w = torch.zeros((b, e), dtype=weights.dtype, device=x.device)
        dense_w = dense_w.scatter(1, ids, weights)  # [B, E]
        y = (out * dense_w.t().unsqueeze(-1)).to(x.dtype).sum(dim=0)
    if moe.shared is not None:
        y = y + moe.shared(x)
    return y


def mlp_decode(mlp, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mlp, DenseMLP):
        return mlp(x)
    return moe_decode(mlp, x)


def decode_step(
    model: CausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    ctx_rows: torch.Tensor,
    planes: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One decode step of every sequence (see the module doc). Returns (logits [B, V] fp32,
    new rows per plane [Ln, B, *tail] for the layers listed by ``stored_layers(model)``)."""
    cfg = model.cfg
    c = ctx_rows.shape[1]
    cols = torch.arange(c, device=ctx_rows.device)
    valid = cols[None, :] <= positions[:, None]  # causal: [B, C]
    cos_sin = model.rope.cos_sin(positions, model.dtype)
    state = {"cos_sin": cos_sin, "positions": positions, "sel": None}
    new_rows: dict[str, list[torch.Tensor]] = {name: [] for name in planes}
    h = F.embedding(input_ids, model.embed)  # [B, D]
    for li, layer in enumerate(model.layers):
        x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
        lp = {name: t[li] for name, t in planes.items()}  # [rows, *tail] per plane
        attn, rows = layer.attn.forward_decode(x, ctx_rows, lp, valid, state)
        for name, r in rows.items():
            new_rows[name].append(r)
        h = h + attn
        x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
        h = h + mlp_decode(layer.mlp, x)
    h = rms_norm(h, model.norm, cfg.rms_norm_eps)
    logits = linear(h, model.lm_head).float()
    return logits, {name: torch.stack(rs) for name, rs in new_rows.items() if rs}


def stored_layers(model: CausalLM) -> dict[str, list[int]]:
    """Plane name -> the layers whose rows decode_step returns, in order (GLM-5 "shared"
    indexer layers store no indexer keys, as in the eager path)."""
    cfg = model.cfg
    if not cfg.is_mla:
        every = list(range(cfg.num_layers))
        return {"k": every, "v": every}
    full = [li for li, ly in enumerate(model.layers) if ly.attn.indexer is not None]
    return {"latent": list(range(cfg.num_layers)), "index_k": full}


__all__ = ["decode_step", "gather_context", "moe_decode", "stored_layers"]
