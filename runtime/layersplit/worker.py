"""One LayerSplit rank: context-parallel prefill, owner-served decode, greedy generation.

Prefill of a prompt of L tokens (token t on rank t % N), per layer l with owner o:
  1. every rank projects its tokens (MLA: q, latent, indexer q/k; GQA: q, k, v);
  2. gather to owner: each rank sends its new plane rows to o, which stores all L rows;
  3. o broadcasts layer l's planes for positions [0, L) (async, index_k first, then latent);
  4. DSA: each rank waits for index_k, computes its queries' top-k while the latent broadcast
     is still in flight, then waits for the latent; attention of its queries over the context;
  5. residual, post norm and MLP/MoE for its tokens (weights are replicated on every rank).
The broadcast buffers are freed after the layer: only the owner keeps the planes.

Decode of one token at position p: the hidden state travels to each layer's owner, which runs
the whole layer on its local planes (stores the token's rows, DSA selection, attention, MLP).
Only the hidden state [D] (+ the DSA selection for a following shared layer) crosses ranks, and
only where ownership changes (contiguous ownership: N - 1 hops). The last holder broadcasts
the final hidden state; every rank computes the same logits and greedy token.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime.kv.pool import token_rows
from runtime.layersplit.attention import (
    dsa_select,
    gqa_attend,
    gqa_project,
    mla_attend,
    mla_project,
)
from runtime.layersplit.ownership import RankKV, layer_planes, owner_of
from runtime.layersplit.telemetry import RankTelemetry
from runtime.models.layers import linear, rms_norm


class RankWorker:
    def __init__(self, model, rank: int, world: int, owners, num_slots: int, page_size: int):
        self.model, self.cfg = model, model.cfg
        self.rank, self.world, self.owners = rank, world, [tuple(o) for o in owners]
        self.owner = owner_of(self.owners)
        self.page_size, self.num_slots = page_size, num_slots
        self.dtype, self.device = model.dtype, model.device
        self.kv = RankKV(self.cfg, self.owners[rank], num_slots, page_size, self.dtype, self.device)
        self.c = dict.fromkeys(
            ("bsent", "brecv", "gsent", "grecv", "hop_bytes", "hops", "prefill", "decode"), 0
        )
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
        cos, sin = self.model.rope.cos_sin(pos, self.dtype)
        attn = self.model.layers[li].attn
        return (mla_project if self.cfg.is_mla else gqa_project)(attn, x, cos, sin)

    def _mlp(self, li: int, h: torch.Tensor) -> torch.Tensor:
        layer = self.model.layers[li]
        return h + layer.mlp(rms_norm(h, layer.post_norm, self.cfg.rms_norm_eps))

    def _final(self, h_last: torch.Tensor | None, src: int) -> torch.Tensor:
        """Broadcast the last token's hidden state [1, D] from src; logits [V] on every rank."""
        buf = h_last if self.rank == src else self._empty(1, (self.cfg.hidden_size,))
        buf = buf.contiguous()
        if self.world > 1:
            dist.broadcast(buf, src=src)
        h = rms_norm(buf, self.model.norm, self.cfg.rms_norm_eps)
        return linear(h, self.model.lm_head).float()[0]

    # ------------------------------------------------------------------ prefill
    def _gather_to_owner(self, li: int, rows: dict, length: int, all_rows: torch.Tensor):
        """Every rank's new plane rows of layer li land in the owner's pool."""
        o, names = self.owner[li], self._planes(li)
        all_rows = all_rows[:length]
        if self.rank != o:
            if rows is not None:
                packed = torch.cat([rows[n].reshape(rows[n].shape[0], -1) for n in names], -1)
                dist.send(packed.contiguous(), dst=o)
                self.c["gsent"] += packed.numel() * packed.element_size()
            return
        widths = [int(torch.tensor(self._tail(n)).prod()) for n in names]
        bufs, works = {}, []
        for r in range(self.world):
            n_r = len(range(r, length, self.world))
            if r == o or n_r == 0:
                continue
            bufs[r] = self._empty(n_r, (sum(widths),))
            works.append(dist.irecv(bufs[r], src=r))
        for w in works:
            w.wait()
        if rows is not None:
            for n in names:
                self.kv.store(li, n, all_rows[self.rank :: self.world], rows[n])
        for r, buf in bufs.items():
            self.c["grecv"] += buf.numel() * buf.element_size()
            for n, part in zip(names, buf.split(widths, dim=-1), strict=True):
                self.kv.store(li, n, all_rows[r :: self.world], part.reshape(-1, *self._tail(n)))

    def _broadcast_planes(self, li: int, ctx_rows: torch.Tensor) -> dict:
        """Start the owner's async broadcasts of layer li's planes over ctx_rows."""
        o, out, held = self.owner[li], {}, 0
        for n in self._planes(li):
            if self.rank == o:
                buf = self.kv.gather(li, n, ctx_rows)
                self.c["bsent"] += buf.numel() * buf.element_size()
            else:
                buf = self._empty(len(ctx_rows), self._tail(n))
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

    def prefill(self, ids: list[int], all_rows: torch.Tensor) -> torch.Tensor:
        """Context-parallel prefill of one prompt; logits [V] of its last token (every rank)."""
        length, cfg = len(ids), self.cfg
        pos = torch.arange(self.rank, length, self.world, device=self.device)
        n = len(pos)
        self.c["prefill"] += n
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        h = F.embedding(ids_t[pos], self.model.embed) if n else None
        ctx_rows = all_rows[:length]
        sel = None
        for li, layer in enumerate(self.model.layers):
            qry = rows = None
            if n:
                x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
                qry, rows = self._attn_layer(li, x, pos)
            self._gather_to_owner(li, rows, length, all_rows)
            planes = self._broadcast_planes(li, ctx_rows)
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
        return self._final(h[-1:] if self.rank == src else None, src)

    # ------------------------------------------------------------------ decode
    def _hop(self, h, sel, src: int, dst: int, ctx_len: int):
        """Move the decode hidden state [1, D] (+ DSA selection) from src to dst."""
        with_sel = self.cfg.is_mla and ctx_len > self.cfg.index_topk
        k = self.cfg.index_topk
        if self.rank == src:
            msg = [h.contiguous()]
            if with_sel:
                head = torch.full((1 + k,), -1, dtype=torch.long, device=self.device)
                if sel is not None:
                    head[0], head[1:] = 1, sel[0]
                msg.append(head)
            for m in msg:
                dist.send(m, dst=dst)
                self.c["hop_bytes"] += m.numel() * m.element_size()
            self.c["hops"] += 1
            return None, None
        h = self._empty(1, (self.cfg.hidden_size,))
        dist.recv(h, src=src)
        sel = None
        if with_sel:
            head = self._empty(1 + k, (), torch.long)
            dist.recv(head, src=src)
            sel = head[1:][None] if int(head[0]) == 1 else None
        return h, sel

    def decode(self, tok: int, p: int, all_rows: torch.Tensor) -> torch.Tensor:
        """One greedy step for the token at position p; logits [V] on every rank."""
        cfg = self.cfg
        ctx_rows, row = all_rows[: p + 1], all_rows[p : p + 1]
        pos = torch.tensor([p], device=self.device)
        holder, h, sel = self.owner[0], None, None
        if self.rank == holder:
            h = F.embedding(torch.tensor([tok], device=self.device), self.model.embed)
        for li, layer in enumerate(self.model.layers):
            o = self.owner[li]
            if o != holder:
                if self.rank in (holder, o):
                    h, sel = self._hop(h, sel, holder, o, p + 1)
                holder = o
            if self.rank != o:
                continue
            self.c["decode"] += 1
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            qry, rows = self._attn_layer(li, x, pos)
            for n, v in rows.items():
                self.kv.store(li, n, row, v)
            attn = layer.attn
            if cfg.is_mla:
                if attn.indexer is not None:
                    sel = dsa_select(attn, qry, pos, self.kv.gather(li, "index_k", ctx_rows))
                out = mla_attend(attn, qry, pos, self.kv.gather(li, "latent", ctx_rows), sel)
            else:
                keys, vals = self.kv.gather(li, "k", ctx_rows), self.kv.gather(li, "v", ctx_rows)
                out = gqa_attend(attn, qry, pos, keys, vals)
            h = self._mlp(li, h + out)
        return self._final(h if self.rank == holder else None, holder)

    # ------------------------------------------------------------------ generation
    def generate(self, ids: list[int], max_new_tokens: int, eos_ids=()) -> tuple[list, list]:
        """Greedy tokens and the logits [V] that chose each. Pages are scattered on purpose."""
        total = len(ids) + max_new_tokens
        need = -(-total // self.page_size)
        assert need <= self.num_slots, f"{total} tokens need {need} pages > {self.num_slots}"
        pages = list(range(self.num_slots))[::-1][:need]
        all_rows = token_rows(pages, 0, need * self.page_size, self.page_size).to(self.device)
        with torch.inference_mode():
            logits = [self.prefill(ids, all_rows)]
            tokens = [int(logits[-1].argmax())]
            while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
                p = len(ids) + len(tokens) - 1
                logits.append(self.decode(tokens[-1], p, all_rows))
                tokens.append(int(logits[-1].argmax()))
        return tokens, logits

    def telemetry(self) -> RankTelemetry:
        c = self.c
        return RankTelemetry(
            rank=self.rank,
            owned_layers=self.owners[self.rank],
            kv_bytes={"L1": self.kv.total_bytes},
            bcast_bytes_sent=c["bsent"],
            bcast_bytes_recv=c["brecv"],
            bcast_time_s=self.bcast_time,
            bcast_buffer_peak=self.buf_peak,
            gather_bytes_sent=c["gsent"],
            gather_bytes_recv=c["grecv"],
            hop_bytes=c["hop_bytes"],
            hops=c["hops"],
            prefill_tokens=c["prefill"],
            decode_layers=c["decode"],
        )
