"""Speculative decoding with the checkpoint's own MTP layer (runtime/models/mtp.py).

One engine step of a decoding sequence with drafts d_1..d_k (proposed at the end of its
previous step), committed tokens t_0..t_m (t_m not yet fed):

1. verify: the main model runs [t_m, d_1..d_k] at positions m..m+k in one forward over paged KV
   and returns the logits of all k + 1 rows and every row's final-norm hidden state;
2. accept (`accept`): greedy drafts are accepted while they equal the target's argmax; sampled
   drafts by the standard rejection rule (accept d_i with probability min(1, p_i(d)/q_i(d)),
   else sample from max(0, p_i - q_i) normalised; after k acceptances sample from p_k), so the
   output distribution is the target's. The result is [d_1..d_a, b]: a accepted drafts, then
   the target's token b;
3. extend (`Drafter.extend`): the MTP layer computes its rows for the positions whose inputs are
   now final (row q needs t_q and the main hidden state at q - 1): [m + 1, m + a + 1] (a prefill
   chunk [s, e) gives [s + 1, e]; row 0 and a prefix-cache hit's first row are handled by the
   scheduler: see `SeqWork.lead_token`). The last row's logits give the next step's d_1;
4. chain: the MTP layer is reapplied on its own output to draft d_2..d_k (rows m + a + 2 ..),
   provisional rows that the next step's extend overwrites before any read.

KV invariants (docs/architecture.md): every row this writes lies in the sequence's own pages
registered as written by the step (`Scheduler._rows_upto`); rows at positions >= the accepted
length (`SeqState.computed`; MTP rows > it) are dead: no read reaches them before a later step
rewrites them (reads are causal and every step writes its rows before reading them), and only
pages of rows below the accepted length are committed to the prefix tree and to L2/L3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.kv.pool import token_rows
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.sampling import SamplingParams, probabilities

DEFAULT_DRAFT_TOKENS = 2  # --speculative auto with an MTP layer, GPU (not measured yet)
CPU_DRAFT_TOKENS = 1  # on the CPU: the fastest measured (docs/performance.md, speculative)


def default_draft_tokens(device) -> int:
    """Draft tokens of --speculative auto on `device` (a model with MTP layers). On the CPU a
    verify row costs nearly a decode step's compute and every draft an MTP call, so one draft
    is fastest there (measured on the demo: docs/performance.md); on a GPU a verify of a few
    rows costs about one, as in the peers' defaults."""
    return CPU_DRAFT_TOKENS if str(device).startswith("cpu") else DEFAULT_DRAFT_TOKENS


@dataclass
class AcceptStats:
    """Per request: how the drafts fared (the acceptance integrity signal)."""

    steps: int = 0  # verify steps with at least one draft
    drafted: int = 0
    accepted: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)  # (drafted, accepted) per step

    @property
    def accept_length(self) -> float:
        """Mean tokens per verify step (accepted drafts + the target's token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def accept_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def note(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.history.append((drafted, accepted))


def accept(
    logits: torch.Tensor,
    drafts: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    gen: torch.Generator,
) -> list[int]:
    """logits [k + 1, V] of the verified rows, drafts d_1..d_k, draft_probs [k, V] (the
    distributions the drafts were sampled from; None when greedy) -> [d_1..d_a, b]."""
    k = len(drafts)
    if params.temperature == 0:
        target = logits.argmax(-1).tolist()
        a = 0
        while a < k and drafts[a] == target[a]:
            a += 1
        return drafts[:a] + [target[a]]
    p = probabilities(logits, params)  # [k + 1, V]
    for i, d in enumerate(drafts):
        q = draft_probs[i]
        ratio = float(p[i, d]) / max(float(q[d]), 1e-30)
        u = float(torch.rand((), generator=gen))
        if u < min(1.0, ratio):
            continue
        residual = (p[i] - q).clamp_min(0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]
        return drafts[:i] + [int(torch.multinomial(dist, 1, generator=gen))]
    return drafts + [int(torch.multinomial(p[k], 1, generator=gen))]


def draft_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator):
    """logits [V] of the MTP layer -> (draft token, its distribution [V] or None if greedy)."""
    if params.temperature == 0:
        return int(logits.argmax()), None
    q = probabilities(logits[None], params)[0]
    return int(torch.multinomial(q, 1, generator=gen)), q


@dataclass
class _Extend:
    """One sequence's share of the extend pass."""

    rid: str
    chunk: SeqChunk
    table: tuple[int, ...]
    end: int  # last valid MTP row written (== the sequence's accepted length)
    pick: int  # index of row `end` among the sequence's rows


class Drafter:
    """Runs the MTP layer for an engine: the extend + chain passes after each step's sampling.
    Holds each running request's pending draft distributions (sampled decoding) and stats."""

    def __init__(self, model, pool, page_size: int, draft_tokens: int, runner):
        """``runner``: the engine's ModelRunner (runtime/models/runner.py), which runs the MTP
        layer through a compiled CPU step when it can, else eagerly."""
        assert model.mtp and draft_tokens >= 1
        self.model, self.pool, self.ps, self.k = model, pool, page_size, draft_tokens
        self.runner = runner
        runner.speculate(draft_tokens)
        self.max_pos = model.cfg.max_position_embeddings
        self.draft_probs: dict[str, torch.Tensor | None] = {}

    def forget(self, rid: str) -> None:
        self.draft_probs.pop(rid, None)

    def extend(self, batch, fb: ForwardBatch, hidden: torch.Tensor, tokens_after, requests):
        """After sampling: the MTP rows whose inputs are final, then the chain of drafts.

        ``batch``: the ScheduledBatch; ``fb``: the main forward's batch (its rows of each
        sequence, the lead token first when there is one); ``hidden`` [T, D] its final-norm
        hidden states; ``tokens_after[rid]``: the sequence's whole token list after this step
        (None: nothing to draft, e.g. its reads were distrusted). Returns ({rid: drafts},
        {rid: n}: the MTP rows [0, n) now valid) for Scheduler.set_drafts / commit.

        A decode step's sequence (the last token + k drafts at m..m+k) always gets k + 1 MTP
        rows, m+1..m+k+1, so that every such batch has one shape (compiled on CPU): the rows
        past the accepted length m+a+1 come from rejected drafts and are dead (never read
        before rewritten); the draft comes from row m+a+1."""
        dev = self.model.device
        items, ids, prev, pos, rows, off = [], [], [], [], [], 0
        for w, c in zip(batch.seqs, fb.seqs, strict=True):
            toks = tokens_after.get(w.request_id)
            if toks is None:
                continue
            lead = 1 if w.lead_token >= 0 else 0
            known = len(w.token_ids) - w.n_draft
            accepted = len(toks) - (w.start + known)  # tokens appended this step
            end = w.start + known + max(0, accepted - 1)  # the accepted length
            cover = min(len(w.page_table) * self.ps, self.max_pos)
            if end + 1 > cover:
                continue  # at the request's length limit: it finishes this step
            n = len(w.token_ids)
            if w.sample and known == 1 and not lead and w.start + 1 + n <= cover:
                a0, stop = w.start + 1, w.start + 1 + n  # fixed shape: k + 1 rows
                toks = toks + list(w.token_ids[len(toks) - stop :]) if len(toks) < stop else toks
                nl = n  # fixed shape: every row's logits (the compiled bucket returns them all)
            else:
                a0, stop = (0 if w.start == 0 else w.start + 1 - lead), end + 1
                nl = 1
            q = torch.arange(a0, stop)
            ids.append(torch.tensor(toks[a0:stop]))
            flat = c.offset + (q - 1 - c.start)  # main row of position q - 1
            h = hidden[flat.clamp_min(0).to(dev)]
            if a0 == 0:
                h[0] = 0  # no position -1
            prev.append(h)
            pos.append(q)
            ctx = token_rows(w.page_table, 0, stop, self.ps)
            rows.append(ctx[a0:])
            chunk = SeqChunk(
                a0, stop, off, ctx.to(dev), w.request_id, list(w.page_table), n_logits=nl
            )
            items.append(_Extend(w.request_id, chunk, w.page_table, end, end - a0))
            off += stop - a0
        if not items:
            return {}, {}
        fbm = ForwardBatch(
            torch.cat(ids).to(dev),
            torch.cat(pos).to(dev),
            torch.cat(rows).to(dev),
            [it.chunk for it in items],
        )
        logits, out = self.runner.draft(fbm, torch.cat(prev))
        picked_logits, picked_out, row = [], [], 0
        for it in items:  # the row of position `end` of each sequence
            c = it.chunk
            picked_logits.append(logits[row + c.n_logits - (c.n - it.pick)])
            picked_out.append(out[c.offset + it.pick])
            row += c.n_logits
        rows_valid = {it.rid: it.end + 1 for it in items}
        return self._chain(items, picked_logits, picked_out, requests), rows_valid

    def _chain(self, items: list[_Extend], logits, outs, requests) -> dict[str, list[int]]:
        """Draft d_1 from the extend's last rows, then d_2..d_k by reapplying the layer."""
        dev = self.model.device
        drafts: dict[str, list[int]] = {}
        probs: dict[str, list] = {}
        live = []
        for i, it in enumerate(items):
            req = requests[it.rid]
            d, q = draft_token(logits[i], req.params, req.generator)
            drafts[it.rid], probs[it.rid] = [d], [q]
            live.append((it, outs[i]))
        for j in range(1, self.k):
            # position of the next draft's MTP row: end + j (input d_j, state from end + j - 1)
            live = [
                (it, h) for it, h in live if it.end + j < min(len(it.table) * self.ps, self.max_pos)
            ]
            if not live:
                break
            chunks, rows = [], []
            for b, (it, _) in enumerate(live):
                p = it.end + j
                ctx = token_rows(it.table, 0, p + 1, self.ps)
                rows.append(ctx[p:])
                chunks.append(SeqChunk(p, p + 1, b, ctx.to(dev), it.rid, list(it.table)))
            fbc = ForwardBatch(
                torch.tensor([drafts[it.rid][-1] for it, _ in live], device=dev),
                torch.tensor([it.end + j for it, _ in live], device=dev),
                torch.cat(rows).to(dev),
                chunks,
            )
            prev = torch.stack([h for _, h in live])
            logits, out = self.runner.draft(fbc, prev)
            nxt = []
            for b, (it, _) in enumerate(live):
                req = requests[it.rid]
                d, q = draft_token(logits[b], req.params, req.generator)
                drafts[it.rid].append(d)
                probs[it.rid].append(q)
                nxt.append((it, out[b]))
            live = nxt
        for rid, qs in probs.items():
            self.draft_probs[rid] = None if qs[0] is None else torch.stack(qs)
        return drafts
