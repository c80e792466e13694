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

The model's one forward (``CausalLM.run``) runs over ``GatheredDecodeStep``, a step backend
(runtime/models/steps.py) whose attention reads fixed-size gathered contexts with masks and
whose ``store`` collects the new rows instead of writing the pool; greedy tokens equal the
eager path's; tests/runtime/test_cpu_graph.py holds the two together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from runtime.models.layers import Experts, MoE
from runtime.models.steps import TorchOps

if TYPE_CHECKING:
    from runtime.models.base import CausalLM


def new_token_columns(positions: torch.Tensor, n: int):
    """Rows r = b*n + j of B sequences with n new tokens each, row r at position p_b + j:
    (cols [R, n] = p_b + j', src [R, n] = b*n + j') for j' < n: where row r's gathered context
    holds its sequence's new rows (those past its own position are masked by causality)."""
    r = positions.shape[0]
    j = torch.arange(r, device=positions.device) % n
    offs = torch.arange(n, device=positions.device)
    first = positions - j
    return first[:, None] + offs[None], (torch.arange(r, device=positions.device) - j)[
        :, None
    ] + offs[None]


def gather_context(
    plane: torch.Tensor, ctx_rows: torch.Tensor, new: torch.Tensor, positions, n: int = 1
):
    """plane [rows, *tail], ctx_rows [R, C], new [R, *tail], positions [R] -> [R, C, *tail]
    with the new rows of each row's sequence at their columns (n new tokens per sequence; with
    n = 1 column p_b holds the new token's row).

    Written as a gather followed by a scatter of the new rows (not a `where`): compiled, the
    scatter makes Inductor write the gathered context into one buffer that the attention reads
    with plain vector loads, instead of re-evaluating the indirect gather inside every
    attention loop (measured 10x slower at B = 8)."""
    ctx = plane[ctx_rows]  # [R, C, *tail]
    b = ctx_rows.shape[0]
    if n == 1:
        return ctx.index_put((torch.arange(b, device=ctx.device), positions), new.to(ctx.dtype))
    cols, src = new_token_columns(positions, n)
    rows = torch.arange(b, device=ctx.device)[:, None].expand(b, n)
    return ctx.index_put((rows, cols), new[src].to(ctx.dtype))


def routed_decode(
    experts: Experts, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Routed experts for a few tokens without host syncs: x [B, D], weights / ids [B, K] ->
    [B, D]. Each token's selected experts are applied through gathered weights (fused multiply
    + sum when compiled); or, once B*K >= 4E (the gathers would read each expert several times
    over), every expert runs on every token and the routing weights (zero for unselected
    experts) combine them."""
    gu_all, dn_all = experts.stacked()  # [E, 2I, D], [E, D, I]
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
        return out.view(b, k, -1).sum(dim=1)
    gu = torch.einsum("bd,efd->ebf", x, gu_all)  # [E, B, 2I]
    act = F.silu(gu[..., : i2 // 2]) * gu[..., i2 // 2 :]
    out = torch.bmm(act, dn_all.transpose(1, 2))  # [E, B, D]
    dense_w = torch.zeros((b, e), dtype=weights.dtype, device=x.device)
    dense_w = dense_w.scatter(1, ids, weights)  # [B, E]
    return (out * dense_w.t().unsqueeze(-1)).to(x.dtype).sum(dim=0)


def routed_packed_decode(gu, dn, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    """Routed experts held as packed CPU stacks (runtime/weights/quant_cpu.py; gu [E] x [2I, D],
    dn [E] x [D, I]) for a few tokens: x [B, D], weights / ids [B, K] -> [B, D].

    Each (token, selected expert) pair runs the packed GEMV kernels on an expert id read inside
    the graph (``.item()``: on the CPU a plain memory read, no device sync), so only the selected
    experts' bytes are read, in place (``gu[e]`` is a view of the stack). No "every expert on
    every token" branch as routed_decode has: torch's packed int8 / int4 kernels cost ~3-10x
    more per call at 8 rows than at 1 (measured, docs/performance.md), so B*K one-row calls beat
    E eight-row calls at every batch the buckets serve."""
    b, k = ids.shape
    e, i = len(gu), gu.shape[0] // 2
    rows = []
    for t in range(b):
        xt = x[t : t + 1]  # [1, D]
        for j in range(k):
            ex = ids[t, j].item()
            torch._check(ex >= 0)
            torch._check(ex < e)
            h = gu[ex](xt)  # [1, 2I]
            rows.append(dn[ex](F.silu(h[:, :i]) * h[:, i:]))  # [1, D]
    out = torch.cat(rows).view(b, k, -1)  # [B, K, D]
    contrib = (out * weights.unsqueeze(-1)).to(x.dtype)  # fp32 weights as the reference
    order = ids.argsort(dim=1)  # each token's experts in ascending id, as the eager loop adds
    contrib = contrib.gather(1, order.unsqueeze(-1).expand_as(contrib))
    return _sum_in_order(contrib.transpose(0, 1))


def _sum_in_order(parts: torch.Tensor) -> torch.Tensor:
    """parts [P, B, D] -> [B, D], added one by one in the parts' dtype (a rounding per add), as
    layers.Experts._loop's index_add_ accumulates experts in ascending id: in bf16 the compiled
    step then emits the eager path's tokens (one fp32 reduction rounds differently)."""
    y = parts[0]
    for p in range(1, parts.shape[0]):
        y = y + parts[p]
    return y


def moe_decode(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE block of a decode step as GatheredDecodeStep runs it (x [B, D] -> [B, D])."""
    return moe(x, GatheredDecodeStep)


class GatheredDecodeStep(TorchOps):
    """Step backend of one decode step over padded gathered contexts (see the module doc):
    ctx_rows / valid [B, C]; ``planes``: name -> [L, rows, *tail]. ``store`` keeps the layer's
    new rows (returned by ``decode_step``; the pool is never written here) and attention reads
    them at column p_b of the gathered context."""

    def __init__(self, model, positions, ctx_rows, planes: dict[str, torch.Tensor], n: int = 1):
        """``n``: new tokens per sequence (rows b*n .. b*n + n - 1 are sequence b's, at
        consecutive positions): 1 for a decode step, 1 + k to verify k drafts."""
        super().__init__(model.rope, positions, model.dtype)
        self.positions, self.ctx_rows, self.planes, self.n = positions, ctx_rows, planes, n
        cols = torch.arange(ctx_rows.shape[1], device=ctx_rows.device)
        self.valid = cols[None, :] <= positions[:, None]  # causal: [B, C]
        self.new_rows: dict[str, list[torch.Tensor]] = {name: [] for name in planes}
        self._current: dict[str, torch.Tensor] = {}  # this layer's new rows per plane

    def store(self, layer, plane, rows):
        self._current[plane] = rows
        self.new_rows[plane].append(rows)

    def _context(self, layer: int, plane: str) -> torch.Tensor:
        """[B, C, *tail]: the plane's gathered context with the new rows at column p_b."""
        return gather_context(
            self.planes[plane][layer], self.ctx_rows, self._current[plane], self.positions, self.n
        )

    def dsa_topk(self, attn, layer, q, w):
        """The DSA selection mask [B, C]: top-k of the index scores among causal positions, or
        every causal position while the context fits in index_topk."""
        cfg, valid = attn.cfg, self.valid
        keys = self._context(layer, "index_k").float()  # [B, C, Di]
        scale = cfg.index_head_dim**-0.5
        scores = F.relu((q.float()[:, :, None, :] * keys[:, None]).sum(-1) * scale)  # [B, Hi, C]
        index_scores = (w[..., None] * scores).sum(1).masked_fill(~valid, float("-inf"))
        top = index_scores.topk(min(cfg.index_topk, valid.shape[1]), dim=-1).indices
        sel = torch.zeros_like(valid).scatter(1, top, True) & valid
        fits = (self.positions < cfg.index_topk)[:, None]  # context <= index_topk
        return torch.where(fits, valid, sel)

    def mla(self, attn, layer, q_nope, q_rope, sel):
        b, kl = q_nope.shape[0], attn.cfg.kv_lora_rank
        allowed = self.valid if sel is None else sel  # [B, C]
        kv = self._context(layer, "latent")  # [B, C, Kl+R]
        # The contractions are written as broadcast products + sums, not einsum/bmm: compiled,
        # each fuses with its neighbours into one vectorised loop (ATen's bmm on these small,
        # strided batches cost ~100 us each at B = 8).
        q_lat = (q_nope[..., None] * attn.w_uk[None]).sum(2)  # [B, H, Kl]
        q_abs = torch.cat([q_lat, q_rope], dim=-1)  # [B, H, Kl+R]
        scores = (q_abs[:, :, None, :] * kv[:, None]).sum(-1).float() * attn.scaling  # [B, H, C]
        scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(q_rope.dtype)
        o_lat = (probs[..., None] * kv[:, None, :, :kl]).sum(2)  # [B, H, Kl]
        out = (o_lat[:, :, None, :] * attn.w_uv[None]).sum(-1)  # [B, H, Vd]
        return out.reshape(b, -1)

    def gqa(self, attn, layer, q):
        b, h, dh = q.shape
        keys = self._context(layer, "k")  # [B, C, Hk, Dh]
        vals = self._context(layer, "v")
        hk = keys.shape[2]
        qs = q.view(b, hk, h // hk, dh)
        scores = torch.einsum("bkgd,bckd->bkgc", qs, keys).float() * dh**-0.5  # [B, Hk, G, C]
        probs = scores.masked_fill(~self.valid[:, None, None, :], float("-inf")).softmax(-1)
        return torch.einsum("bkgc,bckd->bkgd", probs.to(q.dtype), vals).reshape(b, h * dh)

    @staticmethod
    def experts(experts, x, weights, ids):
        packed = experts.packed_stacks()
        if packed is not None and hasattr(packed[0], "routed"):  # one grouped call (vnni.py)
            return packed[0].routed(packed[1], x, weights, ids)
        if packed is not None:  # int8 / int4 stacks on the CPU
            return routed_packed_decode(*packed, x, weights, ids)
        return routed_decode(experts, x, weights, ids)

    def last_rows(self, h):
        return h


def decode_step(
    model: CausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    ctx_rows: torch.Tensor,
    planes: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One decode step of every sequence (see the module doc). Returns (logits [B, V] fp32,
    new rows per plane [Ln, B, *tail] for the layers listed by ``stored_layers(model)``)."""
    step = GatheredDecodeStep(model, positions, ctx_rows, planes)
    logits = model.run(input_ids, step)
    return logits, {name: torch.stack(rs) for name, rs in step.new_rows.items() if rs}


def verify_step(model, input_ids, positions, ctx_rows, planes, n: int):
    """A decode step of B sequences with n new tokens each (the last token, then n - 1
    drafts; rows b*n + j): (logits [B*n, V] of every row, final-norm hidden [B*n, D], new rows
    per plane [Ln, B*n, *tail]), the speculative verify (runtime/speculative.py)."""
    step = GatheredDecodeStep(model, positions, ctx_rows, planes, n)
    logits, hidden = model.run(input_ids, step, keep_hidden=True)
    return logits, hidden, {name: torch.stack(rs) for name, rs in step.new_rows.items() if rs}


def mtp_step(model, input_ids, positions, prev_hidden, ctx_rows, planes, n: int):
    """The MTP layer (runtime/models/mtp.py) over B sequences x n rows: (logits [B*n, V],
    outputs [B*n, D], new rows per plane [1, B*n, *tail] of the MTP layer)."""
    from runtime.models.mtp import mtp_forward

    step = GatheredDecodeStep(model, positions, ctx_rows, planes, n)
    logits, out = mtp_forward(model, model.mtp[0], input_ids, prev_hidden, step)
    return logits, out, {name: torch.stack(rs) for name, rs in step.new_rows.items() if rs}


def stored_layers(model: CausalLM, mtp: bool = False) -> dict[str, list[int]]:
    """Plane name -> the layers whose rows decode_step returns, in order (GLM-5 "shared"
    indexer layers store no indexer keys, as in the eager path); ``mtp``: mtp_step's (the MTP
    layer, pool layer num_layers, with a full indexer)."""
    cfg = model.cfg
    if mtp:
        n = cfg.num_layers
        return {"latent": [n], "index_k": [n]} if cfg.is_mla else {"k": [n], "v": [n]}
    if not cfg.is_mla:
        every = list(range(cfg.num_layers))
        return {"k": every, "v": every}
    full = [li for li, ly in enumerate(model.layers) if ly.attn.indexer is not None]
    return {"latent": list(range(cfg.num_layers)), "index_k": full}


__all__ = [
    "GatheredDecodeStep",
    "decode_step",
    "gather_context",
    "moe_decode",
    "mtp_step",
    "new_token_columns",
    "verify_step",
    "routed_decode",
    "routed_packed_decode",
    "stored_layers",
]
