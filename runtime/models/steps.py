"""Step backends: what one forward step of the model computes with, and how it reaches the KV.

Every attention and MoE block has one forward (runtime/models/glm_moe_dsa.py, glm4_moe.py,
layers.py), written against the small interface below; a step backend supplies the ops and the
KV-page access for one step. Which backend runs a step is chosen by the model runner
(runtime/models/runner.py) or ``CausalLM.forward``:

- ``EagerStep``: plain torch (the reference), over a ``ForwardBatch``: the new rows go into the
  pool (``KVPool.store``), each sequence's context is gathered through the pool's accessor
  (fence waits) after the batch's ``before_read`` hooks (epoch/owner checks) ran for it.
- ``KernelStep``: the Triton kernels (kernels/) over page tables (``KernelMeta``); CUDA, or
  CPU through Triton's interpreter. CUDA graphs replay it (runtime/models/cuda_graph.py).
- ``GatheredDecodeStep`` (runtime/models/decode_step.py): one token per sequence over padded,
  gathered contexts, no host sync; what the compiled CPU decode step traces.

The interface (duck-typed; every backend has all of it):
- ``norm(x, w, eps)`` RMSNorm; ``add_norm(h, residual, w, eps)`` -> (normed, residual) with
  ``residual = h if residual is None else residual + h`` (the residual stream);
- ``rope_interleaved(x)`` (GLM-5) / ``rope_neox(x)`` (GLM-4.x, partial): RoPE at the step's
  positions;
- ``store(layer, plane, rows)``: the step's new tokens' rows of one plane, [T, *tail];
- ``dsa_topk(attn, layer, q, w)``: the DSA selection (an opaque value the same backend's
  ``mla`` takes; None = every causal position), after the indexer keys were stored;
- ``mla(attn, layer, q_nope, q_rope, sel)`` -> [T, H*Vd] and ``gqa(attn, layer, q)`` ->
  [T, H*Dh]: attention over the context (output projection not applied);
- ``experts(experts, x, weights, ids)`` -> [T, D]: the routed experts;
- ``last_rows(h)``: the rows whose logits the step returns.

Reads: a backend never reads a plane of a layer before the pool's read guard (fence waits) and
the batch's ``before_read`` hooks ran for it (invariant 2 and 3 of docs/architecture.md).
"""

from __future__ import annotations

import torch

from kernels import ops
from runtime.kv.pool import KVPool
from runtime.models import attention_math as am
from runtime.models.batch import ForwardBatch, KernelMeta
from runtime.models.layers import rms_norm
from runtime.models.rope import RotaryTables, rope_interleaved, rope_neox_partial


class TorchOps:
    """Norms and RoPE in plain torch at the given positions (cos/sin [T, R/2])."""

    def __init__(self, rope: RotaryTables, positions: torch.Tensor, dtype: torch.dtype):
        self.positions = positions  # [T]
        self.cos_sin = rope.cos_sin(positions, dtype)

    def norm(self, x, w, eps):
        return rms_norm(x, w, eps)

    def add_norm(self, h, residual, w, eps):
        residual = h if residual is None else residual + h
        return rms_norm(residual, w, eps), residual

    def rope_interleaved(self, x):
        return rope_interleaved(x, *self.cos_sin)

    def rope_neox(self, x):
        return rope_neox_partial(x, *self.cos_sin)


class EagerStep(TorchOps):
    """Plain torch over the pool, one sequence at a time (the reference path; CPU default)."""

    def __init__(self, model, batch: ForwardBatch, pool: KVPool, all_logits: bool = False):
        dev = model.device
        super().__init__(model.rope, batch.positions.to(dev), model.dtype)
        self.batch, self.pool = batch, pool
        self.last = None if all_logits else batch.last_token_index().to(dev)
        self._stored = None  # (kept token indices, their rows) when some rows are not stored
        if batch.has_unstored:
            keep = (batch.new_rows >= 0).nonzero().flatten()
            self._stored = (keep.to(dev), batch.new_rows[keep])

    def store(self, layer, plane, rows):
        if self._stored is None:
            self.pool.store(layer, plane, self.batch.new_rows, rows)
        else:
            keep, at = self._stored
            self.pool.store(layer, plane, at, rows[keep])

    def _context(self, layer: int, plane: str, si: int) -> torch.Tensor:
        """Sequence si's rows [c, *tail] of a plane, after its before_read hooks."""
        for hook in self.batch.before_read:
            hook(layer, plane, si)
        return self.pool.gather(layer, plane, self.batch.seqs[si].ctx_rows)

    def _seqs(self):
        """(index, rows of its new tokens in the flat batch, causal mask [n, c]) per sequence."""
        for si, seq in enumerate(self.batch.seqs):
            pos = torch.arange(seq.start, seq.end, device=seq.ctx_rows.device)
            yield si, slice(seq.offset, seq.offset + seq.n), am.causal_mask(pos, seq.end)

    def dsa_topk(self, attn, layer, q, w):
        """Per sequence: top-k positions [n, k], or None while its context fits in index_topk."""
        cfg, sels = attn.cfg, []
        for si, sl, causal in self._seqs():
            if self.batch.seqs[si].end <= cfg.index_topk:
                sels.append(None)
                continue
            keys = self._context(layer, "index_k", si)  # [c, Di]
            scale = cfg.index_head_dim**-0.5
            sels.append(am.dsa_topk(q[sl], w[sl], keys, causal, scale, cfg.index_topk))
        return sels

    def mla(self, attn, layer, q_nope, q_rope, sel):
        q_abs = am.absorb_queries(q_nope, q_rope, attn.w_uk)  # [H, T, Kl+R]
        outs = []
        for si, sl, causal in self._seqs():
            kv = self._context(layer, "latent", si)  # [c, Kl+R]
            s = sel[si] if sel is not None else None
            lone = sl.stop - sl.start == 1 and s is None  # a lone last token sees every position
            allowed = None if lone else am.selection_mask(causal, s)
            outs.append(am.mla_attend(q_abs[:, sl], kv, allowed, attn.w_uv, attn.scaling))
        return torch.cat(outs).flatten(1)

    def gqa(self, attn, layer, q):
        outs = []
        for si, sl, causal in self._seqs():
            keys = self._context(layer, "k", si)  # [c, Hk, Dh]
            vals = self._context(layer, "v", si)
            outs.append(am.gqa_attend(q[sl], keys, vals, causal))
        return torch.cat(outs).flatten(1)

    def experts(self, experts, x, weights, ids):
        return experts(x, weights, ids)

    def last_rows(self, h):
        return h if self.last is None or h is None else h[self.last]


class Reads:
    """What must run before a kernel reads one plane of one layer for a batch: the pool's
    ``read_guard`` (fence waits, as ``KVPool.gather`` does) over the batch's context rows, then
    the batch's ``before_read`` hooks once per sequence. Call as ``reads(layer, plane)``."""

    def __init__(self, pool: KVPool, batch: ForwardBatch):
        self.pool, self.batch = pool, batch
        self._rows: torch.Tensor | None = None

    def __call__(self, layer: int, plane: str) -> None:
        if self.pool.read_guard is not None:
            if self._rows is None:
                self._rows = torch.cat([s.ctx_rows for s in self.batch.seqs])
            self.pool.read_guard(layer, plane, self._rows)
        for si in range(len(self.batch.seqs)):
            for hook in self.batch.before_read:
                hook(layer, plane, si)


def no_reads(layer: int, plane: str) -> None:
    """Reads of a CUDA graph's recorded step: guarded before each replay instead."""


def read_every_plane(model, reads, max_len: int) -> None:
    """Run ``reads`` for every (layer, plane) a step whose contexts are at most max_len long
    reads: what a replayed or compiled step must do before it runs."""
    for li, layer in enumerate(model.layers):
        for plane in layer.attn.read_planes(max_len):
            reads(li, plane)


class KernelStep:
    """The Triton kernels over page tables, all T tokens at once; no host sync, so a decode step
    is graph-capturable when the weights are plain tensors. cos/sin are [T, R] in transformers'
    layout (cat(freqs, freqs)), as kernels.rope takes them."""

    def __init__(
        self,
        model,
        positions: torch.Tensor,
        km: KernelMeta,
        pool: KVPool,
        reads,
        last_idx: torch.Tensor | None,
    ):
        self.positions = positions  # [T]
        cos, sin = model.rope.cos_sin(positions, model.dtype)  # [T, R/2]
        self.cos, self.sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        self.km, self.pool, self.reads, self.last = km, pool, reads, last_idx
        self._all_positions: torch.Tensor | None = None

    @classmethod
    def for_batch(cls, model, batch: ForwardBatch, pool: KVPool, all_logits: bool = False):
        dev = model.device
        km = batch.kernel_meta(pool.page_size, dev)
        last = None if all_logits else batch.last_token_index().to(dev)
        return cls(model, batch.positions.to(dev), km, pool, Reads(pool, batch), last)

    def norm(self, x, w, eps):
        return ops.rmsnorm(x, w, eps)[0]

    def add_norm(self, h, residual, w, eps):
        return ops.rmsnorm(h, w, eps, residual)

    def rope_interleaved(self, x):
        return ops.rope_interleave(x, self.cos, self.sin)

    def rope_neox(self, x):
        return ops.rope_neox(x, self.cos, self.sin)

    def store(self, layer, plane, rows):
        ops.page_store(self.pool.planes[plane][layer], self.km.slot_mapping, rows)

    def dsa_topk(self, attn, layer, q, w):
        """int32 [T, min(index_topk, max_len)] (-1 = unused), or None when every context fits
        in index_topk (the selection is the causal set)."""
        cfg, km = attn.cfg, self.km
        if km.max_len <= cfg.index_topk:
            return None
        self.reads(layer, "index_k")
        return ops.dsa_indexer_topk(
            q,
            w.contiguous(),
            self.pool.planes["index_k"][layer],
            km.page_table,
            km.token_seq,
            km.token_limit,
            scale=cfg.index_head_dim**-0.5,
            topk=cfg.index_topk,
            max_len=km.max_len,
        )

    def mla(self, attn, layer, q_nope, q_rope, sel):
        km, t = self.km, q_nope.shape[0]
        if sel is None:  # every causal position (token_limit cuts each row)
            if self._all_positions is None:
                self._all_positions = torch.arange(
                    km.max_len, dtype=torch.int32, device=q_nope.device
                ).expand(t, km.max_len)
            sel = self._all_positions
        self.reads(layer, "latent")
        out = ops.mla_decode(
            q_nope,
            q_rope,
            self.pool.planes["latent"][layer],
            km.page_table,
            sel,
            attn.w_uk,
            attn.w_uv,
            scale=attn.scaling,
            row_seq=km.token_seq,
            row_limit=km.token_limit,
        )  # [T, H, Vd]
        return out.reshape(t, -1)

    def gqa(self, attn, layer, q):
        km = self.km
        self.reads(layer, "k")
        self.reads(layer, "v")
        out = ops.gqa_decode(
            q,
            self.pool.planes["k"][layer],
            self.pool.planes["v"][layer],
            km.page_table,
            km.token_limit,
            scale=attn.cfg.head_dim**-0.5,
            row_seq=km.token_seq,
        )  # [T, H, Dh]
        return out.reshape(q.shape[0], -1)

    def experts(self, experts, x, weights, ids):
        y = experts.fused_kernel(x, weights, ids)
        return experts(x, weights, ids) if y is None else y

    def last_rows(self, h):
        return h if self.last is None or h is None else h[self.last]


__all__ = ["EagerStep", "KernelStep", "Reads", "TorchOps", "no_reads", "read_every_plane"]
