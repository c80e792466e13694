"""One LayerSplit rank's compute: context-parallel prefill and owner-served batched decode.

Pages are this rank's (runtime/layersplit/pages.py): every call gets, per sequence, `rows`
[capacity] = this rank's flat pool row of each position (page tables differ across ranks; only
positions are shared coordinates).

Prefill of a sequence's positions [start, L) (the first `start` positions are a reused prefix
already in the owners' pages; position p is computed on rank p % N), per layer l, owner o:
  1. every rank projects its positions (MLA: q, latent, indexer q/k; GQA: q, k, v);
  2. gather to owner: each rank sends its new plane rows to o, which stores them in its pages;
  3. o broadcasts layer l's planes for positions [0, L) from its pages (async, index_k first,
     then latent): the reused prefix travels like the new rows;
  4. DSA: each rank waits for index_k, computes its queries' top-k while the latent broadcast
     is still in flight, then waits for the latent; attention of its queries over the context;
  5. residual, post norm and MLP/MoE for its positions (weights are replicated on every rank).
The broadcast buffers are freed after the layer: only the owner keeps the planes.

Decode of a batch of B sequences (sequence b feeds its last token at position pos[b]): the
hidden states [B, D] travel to each layer's owner, which runs the whole layer on its pages for
all B (stores each token's rows in that sequence's page, per-sequence DSA selection and
attention over that sequence's context, batched projections and MLP). Only [B, D] (+ per
sequence DSA selections [B, 1 + index_topk] for a following shared layer) crosses ranks, and
only where ownership changes (contiguous ownership: N - 1 hops per step, whatever B). The last
holder broadcasts the final hidden states; every rank computes the same logits [B, V].
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime.layersplit.attention import dsa_select, gqa_attend, mla_attend, project
from runtime.layersplit.ownership import RankKV, layer_planes, owner_of
from runtime.models.layers import linear, rms_norm
from runtime.models.steps import TorchOps

COUNTERS = ("bsent", "brecv", "gsent", "grecv", "hop_bytes", "hops", "prefill", "decode")


def _one(qry: dict, b: int) -> dict:
    """Query tensors of batch row b (q_abs is [H, n, .]; the others [n, ...])."""
    return {k: (v[:, b : b + 1] if k == "q_abs" else v[b : b + 1]) for k, v in qry.items()}


class RankWorker:
    def __init__(self, model, rank: int, world: int, owners, kv: RankKV):
        self.model, self.cfg = model, model.cfg
        self.rank, self.world, self.owners = rank, world, [tuple(o) for o in owners]
        self.owner = owner_of(self.owners)
        self.kv = kv
        self.dtype, self.device = model.dtype, model.device
        self.c = dict.fromkeys(COUNTERS, 0)
        self.c.update(decode_steps=0, decode_tokens=0, max_batch=0)
        self.bcast_time = 0.0
        self.buf_peak = 0

    # ------------------------------------------------------------------ helpers
    def _planes(self, layer: int) -> list[str]:
        names = list(layer_planes(self.cfg, layer))
        return sorted(names, key=lambda n: n != "index_k")  # index_k first: feeds the indexer

    def _tail(self, name: str) -> tuple[int, ...]:
        return self.cfg.plane_widths()[name]

    def _empty(self, n: int, tail, dtype=None) -> torch.Tensor:
        return torch.empty((n, *tail), dtype=dtype or self.dtype, device=self.device)

    def _attn_layer(self, li: int, x: torch.Tensor, pos: torch.Tensor):
        ops = TorchOps(self.model.rope, pos, self.dtype)
        return project(self.model.layers[li].attn, x, ops)

    def _mlp(self, li: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.model.layers[li]
        return h + layer.mlp(rms_norm(h, layer.post_norm, self.cfg.rms_norm_eps))

    def _final(self, h: torch.Tensor | None, src: int, n: int) -> torch.Tensor:
        """Broadcast hidden states [n, D] from src; logits [n, V] float32 on every rank."""
        buf = h if self.rank == src else self._empty(n, (self.cfg.hidden_size,))
        buf = buf.contiguous()
        if self.world > 1:
            dist.broadcast(buf, src=src)
        h = rms_norm(buf, self.model.norm, self.cfg.rms_norm_eps)
        return linear(h, self.model.lm_head).float()

    def _positions(self, r: int, start: int, length: int) -> torch.Tensor:
        """Positions in [start, length) computed by rank r in prefill (p % N == r)."""
        first = start + (r - start) % self.world
        return torch.arange(first, length, self.world, device=self.device)

    # ------------------------------------------------------------------ prefill
    def _gather_to_owner(self, li: int, new: dict | None, start: int, length: int, rows):
        """Every rank's new plane rows of layer li land in the owner's pages (rows: the owner's
        flat rows per position)."""
        o, names = self.owner[li], self._planes(li)
        if self.rank != o:
            if new is not None:
                packed = torch.cat([new[n].reshape(new[n].shape[0], -1) for n in names], -1)
                dist.send(packed.contiguous(), dst=o)
                self.c["gsent"] += packed.numel() * packed.element_size()
            return
        widths = [math.prod(self._tail(n)) for n in names]
        bufs, works = {}, []
        for r in range(self.world):
            n_r = len(self._positions(r, start, length))
            if r == o or n_r == 0:
                continue
            bufs[r] = self._empty(n_r, (sum(widths),))
            works.append(dist.irecv(bufs[r], src=r))
        for w in works:
            w.wait()
        if new is not None:
            mine = rows[self._positions(self.rank, start, length)]
            for n in names:
                self.kv.store(li, n, mine, new[n])
        for r, buf in bufs.items():
            self.c["grecv"] += buf.numel() * buf.element_size()
            theirs = rows[self._positions(r, start, length)]
            for n, part in zip(names, buf.split(widths, dim=-1), strict=True):
                self.kv.store(li, n, theirs, part.reshape(-1, *self._tail(n)))

    def _broadcast_planes(self, li: int, ctx_rows: torch.Tensor | None, length: int) -> dict:
        """Start the owner's async broadcasts of layer li's planes for positions [0, length)
        (ctx_rows: the owner's rows of them; None on other ranks)."""
        o, out, held = self.owner[li], {}, 0
        for n in self._planes(li):
            if self.rank == o:
                buf = self.kv.gather(li, n, ctx_rows)
                self.c["bsent"] += buf.numel() * buf.element_size()
            else:
                buf = self._empty(length, self._tail(n))
                self.c["brecv"] += buf.numel() * buf.element_size()
            held += buf.numel() * buf.element_size()
            work = dist.broadcast(buf, src=o, async_op=True) if self.world > 1 else None
            out[n] = (buf, work)
        self.buf_peak = max(self.buf_peak, held)
        return out

    def _wait(self, handle) -> torch.Tensor:
        buf, work = handle
        if work is not None:
            t0 = time.perf_counter()
            work.wait()
            self.bcast_time += time.perf_counter() - t0
        return buf

    def prefill(self, tokens: list[int], start: int, rows: torch.Tensor) -> torch.Tensor:
        """Context-parallel prefill of positions [start, len(tokens)); positions < start are
        already in the owners' pages. rows: this rank's flat rows per position. Returns the
        logits [V] of the last token (every rank)."""
        length, cfg = len(tokens), self.cfg
        assert 0 <= start < length, (start, length)
        pos = self._positions(self.rank, start, length)
        n = len(pos)
        self.c["prefill"] += n
        ids_t = torch.tensor(tokens, dtype=torch.long, device=self.device)
        h = F.embedding(ids_t[pos], self.model.embed) if n else None
        ctx_rows = rows[:length]
        sel = None
        for li, layer in enumerate(self.model.layers):
            qry = new = None
            if n:
                x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
                qry, new = self._attn_layer(li, x, pos)
            self._gather_to_owner(li, new, start, length, rows)
            own = self.rank == self.owner[li]
            planes = self._broadcast_planes(li, ctx_rows if own else None, length)
            attn = layer.attn
            if cfg.is_mla:
                if attn.indexer is not None:
                    keys = self._wait(planes["index_k"])
                    if n:  # overlaps the latent broadcast still in flight
                        sel = dsa_select(attn, qry, pos, keys)
                kv = self._wait(planes["latent"])
                out = mla_attend(attn, qry, pos, kv, sel) if n else None
            else:
                keys, vals = self._wait(planes["k"]), self._wait(planes["v"])
                out = gqa_attend(attn, qry, pos, keys, vals) if n else None
            del planes
            if n:
                h = self._mlp(li, h + out)
        src = (length - 1) % self.world
        return self._final(h[-1:] if self.rank == src else None, src, 1)[0]

    # ------------------------------------------------------------------ decode
    def _hop(self, h, sels: list, src: int, dst: int, with_sel: bool):
        """Move the decode hidden states [B, D] (+ per-sequence DSA selections) src -> dst."""
        k, b = self.cfg.index_topk, len(sels)
        if self.rank == src:
            msg = [h.contiguous()]
            if with_sel:
                head = torch.full((b, 1 + k), -1, dtype=torch.long, device=self.device)
                for i, sel in enumerate(sels):
                    if sel is not None:  # row i: flag 1 + the selection, else all -1
                        head[i, 0], head[i, 1:] = 1, sel[0]
                msg.append(head)
            for m in msg:
                dist.send(m, dst=dst)
                self.c["hop_bytes"] += m.numel() * m.element_size()
            self.c["hops"] += 1
            return None, [None] * b
        h = self._empty(b, (self.cfg.hidden_size,))
        dist.recv(h, src=src)
        sels = [None] * b
        if with_sel:
            head = self._empty(b, (1 + k,), torch.long)
            dist.recv(head, src=src)
            sels = [head[i, 1:][None] if int(head[i, 0]) == 1 else None for i in range(b)]
        return h, sels

    def decode(self, toks: list[int], pos: list[int], rows: list[torch.Tensor]) -> torch.Tensor:
        """One greedy step for B sequences: sequence b feeds toks[b] at position pos[b]; rows[b]
        its flat rows per position (this rank's pages). Returns logits [B, V] (every rank)."""
        cfg, b = self.cfg, len(toks)
        pos_t = torch.tensor(pos, device=self.device)  # [B]
        new_rows = torch.stack([r[p] for r, p in zip(rows, pos, strict=True)])  # [B]
        ctx = [r[: p + 1] for r, p in zip(rows, pos, strict=True)]  # per sequence [p + 1]
        with_sel = cfg.is_mla and max(pos) + 1 > cfg.index_topk  # some selection is sparse
        self.c["decode_steps"] += 1
        self.c["decode_tokens"] += b
        self.c["max_batch"] = max(self.c["max_batch"], b)
        holder, h, sels = self.owner[0], None, [None] * b
        if self.rank == holder:
            h = F.embedding(torch.tensor(toks, device=self.device), self.model.embed)  # [B, D]
        for li, layer in enumerate(self.model.layers):
            o = self.owner[li]
            if o != holder:
                if self.rank in (holder, o):
                    h, sels = self._hop(h, sels, holder, o, with_sel)
                holder = o
            if self.rank != o:
                continue
            self.c["decode"] += 1
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            qry, new = self._attn_layer(li, x, pos_t)
            for n, v in new.items():
                self.kv.store(li, n, new_rows, v)
            attn, outs = layer.attn, []
            for i in range(b):  # attention per sequence: each has its own context and pages
                q, p = _one(qry, i), pos_t[i : i + 1]
                if cfg.is_mla:
                    if attn.indexer is not None:
                        sels[i] = dsa_select(attn, q, p, self.kv.gather(li, "index_k", ctx[i]))
                    kv = self.kv.gather(li, "latent", ctx[i])
                    outs.append(mla_attend(attn, q, p, kv, sels[i]))
                else:
                    keys, vals = self.kv.gather(li, "k", ctx[i]), self.kv.gather(li, "v", ctx[i])
                    outs.append(gqa_attend(attn, q, p, keys, vals))
            h = self._mlp(li, h + torch.cat(outs))
        return self._final(h if self.rank == holder else None, holder, b)
