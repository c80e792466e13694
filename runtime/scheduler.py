"""Scheduler: continuous batching with chunked prefill over the tiered KV cache, on ints only.

One engine iteration is `batch = step()` -> the engine computes `batch.seqs` (writing their new
tokens' planes, reading their page tables after the fences) -> `commit(batch, sampled)`.

- Continuous batching: every running sequence gets its next positions each step, up to
  `max_batch_tokens` positions in all (chunked prefill: a long prompt is computed over several
  steps); new requests are admitted in FIFO order while the budget and `max_running` allow.
- Admission under the page budget: a request's prefix is looked up in every tier (L3 pages are
  first prefetched into L2 while the request waits, reads started once per admission); it is
  admitted only if the pages its prompt still needs can be allocated now (evicting unlocked
  cached pages). Prefix pages are shared.
- Preemption: a sequence that needs a page when none is free evicts cached pages, then waits
  for frees that transfers in flight will bring, then preempts the newest running request not
  yet scheduled this step, itself included (its full pages stay in the prefix tree;
  `preempt="swap"` copies them to L2 first, "recompute" lets the write policy decide) and
  requeues it at the head: it resumes from its prefix.
- Timeouts and `abort()`: the request's pages are released; pages a step in flight still writes
  go DRAINING and return to FREE when `commit` acks that step (safe reclaim, invariant 1).
- Every scheduled page carries the epoch captured now (invariant 3); `commit` first waits for
  and verifies load-backs the batch read, and drops the tokens of sequences whose loaded pages
  failed verification: they are rolled back and recomputed, never emitted.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from runtime.kv.tier_controller import LoadFailure, TierController

__all__ = ["SeqWork", "ScheduledBatch", "StepOutput", "SeqState", "Scheduler"]


class SeqWork(NamedTuple):
    """What one running sequence computes this step."""

    request_id: str
    start: int  # first new position
    token_ids: tuple[int, ...]  # tokens at positions start .. stop-1 (the drafts last)
    page_table: tuple[int, ...]  # L1 slots; page i holds positions [i*P, (i+1)*P), up to stop
    # (and up to stop + the MTP lookahead: the draft layer's rows, runtime/speculative.py)
    epochs: tuple[int, ...]  # epoch of each page_table slot, captured now (invariant 3)
    sample: bool  # the last position's logits give the sequence's next token
    n_draft: int = 0  # trailing token_ids that are speculative drafts, verified by this step
    # With an MTP layer: the token at start - 1, recomputed (not stored: its rows are in the
    # cache) for its hidden state, the draft layer's input at `start`; -1 when not needed.
    lead_token: int = -1

    @property
    def stop(self) -> int:
        return self.start + len(self.token_ids)


class StepOutput(NamedTuple):
    request_id: str
    token_id: int | None  # None when the request ended without a new token
    finished: bool
    finish_reason: str | None  # stop | length | abort | timeout


class ScheduledBatch(NamedTuple):
    step: int
    writer: str  # the writer in flight on every page this step writes (acked by commit)
    seqs: tuple[SeqWork, ...]
    preempted: tuple[str, ...]  # requests sent back to the queue this step
    ended: tuple[StepOutput, ...]  # requests that ended before computing (timeouts)

    @property
    def num_tokens(self) -> int:
        return sum(len(w.token_ids) for w in self.seqs)


@dataclass
class SeqState:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    deadline: float | None
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)  # L1 slots in sequence order
    computed: int = 0  # positions whose planes are stored
    status: str = "waiting"  # waiting | running | finished
    finish_reason: str | None = None
    cached: dict[str, int] | None = None  # prompt tokens served by tier, first admission
    preemptions: int = 0
    order: int = 0  # admission order (newest is preempted first)
    prefetched: bool = False  # L3 reads were started for this admission
    # Speculative decoding (runtime/speculative.py): the draft tokens to verify next step, and
    # the MTP layer's valid rows [0, mtp_rows) (row q needs the main hidden state at q - 1).
    drafts: tuple[int, ...] = ()
    mtp_rows: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Scheduler:
    def __init__(
        self,
        tiers: TierController,
        max_batch_tokens: int = 256,
        max_running: int = 32,
        preempt: str = "recompute",
        clock: Callable[[], float] = time.monotonic,
        mtp_lookahead: int = 0,
    ) -> None:
        """``mtp_lookahead``: 0 without an MTP draft layer; else the rows past a step's last
        position its draft layer writes (max(1, draft length)): their pages are allocated and
        registered as written by the step too."""
        assert preempt in ("recompute", "swap") and max_batch_tokens > 0 and max_running > 0
        self.tiers = tiers
        self.alloc = tiers.alloc
        self.page_size = self.alloc.page_size
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.preempt_mode = preempt
        self.clock = clock
        self.mtp_lookahead = mtp_lookahead
        # The model's context (positions 0 .. max_positions - 1; None: unbounded): drafts are
        # verified only at positions inside it.
        self.max_positions: int | None = None
        self._seqs: dict[str, SeqState] = {}
        self._waiting: deque[SeqState] = deque()
        self._running: list[SeqState] = []
        self._writes: dict[str, list[int]] = {}  # step writer -> slots it writes
        self._steps = itertools.count(1)
        self._orders = itertools.count(1)
        self.preemptions = 0
        self.rolled_back: list[tuple[str, int]] = []  # (request, slot) since the engine looked

    # ---- requests -----------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop_token_ids: Iterable[int] = (),
        timeout_s: float | None = None,
    ) -> None:
        """Queue a request. ValueError for a duplicate id, an empty prompt, or one that can
        never fit the L1 pool (prompt + max_new_tokens pages > slots)."""
        if request_id in self._seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not prompt_ids or max_new_tokens < 1:
            raise ValueError("a request needs a prompt and max_new_tokens >= 1")
        if self._pages_for(len(prompt_ids) + max_new_tokens) > self.alloc.num_slots:
            raise ValueError(f"request {request_id!r} needs more KV pages than the L1 pool has")
        deadline = None if timeout_s is None else self.clock() + timeout_s
        seq = SeqState(
            request_id, list(prompt_ids), max_new_tokens, frozenset(stop_token_ids), deadline
        )
        self._seqs[request_id] = seq
        self._waiting.append(seq)

    def abort(self, request_id: str, reason: str = "abort") -> StepOutput | None:
        """End a waiting or running request now; its pages are released (safe reclaim)."""
        seq = self._seqs.get(request_id)
        return None if seq is None else self._finish(seq, reason)

    def get(self, request_id: str) -> SeqState | None:
        return self._seqs.get(request_id)

    @property
    def running(self) -> list[SeqState]:
        return list(self._running)

    @property
    def waiting(self) -> list[SeqState]:
        return list(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    # ---- one iteration ----------------------------------------------------------------------
    def step(self) -> ScheduledBatch:
        """Choose this step's work. Mutates queues, references and writers (see module doc)."""
        assert not self._writes, "commit() the previous batch first"
        n_step = next(self._steps)
        writer = f"step#{n_step}"
        self._roll_back(self.tiers.poll())
        now = self.clock()
        ended = [
            self._finish(s, "timeout")
            for s in [*self._running, *self._waiting]
            if s.deadline is not None and now >= s.deadline
        ]
        budget, work, preempted = self.max_batch_tokens, [], []
        for seq in sorted(self._running, key=lambda s: s.order):
            if budget <= 0:
                break
            if seq.status != "running":  # preempted by an older sequence this step
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            if n == 1:  # decoding: verify the drafts too, within the budget and the context
                # Every draft is verified even past the request's last token (commit stops at
                # it): one verify shape per draft length, so a request's last steps run the
                # same compiled step as the others (runtime/models/cpu_graph.py).
                room = len(seq.drafts)
                if self.max_positions is not None:
                    room = self.max_positions - 1 - seq.computed
                n += max(0, min(len(seq.drafts), budget - 1, room))
            if self._ensure_pages(seq, self._rows_upto(seq, n), work, preempted):
                work.append((seq, n))
                budget -= n
        blocked = bool(preempted)  # no admission in a step that had to preempt
        for seq in list(self._waiting):
            if blocked or budget <= 0 or len(self._running) >= self.max_running:
                break
            verdict = self._admit(seq)
            if verdict == "full":
                blocked = True
            elif verdict == "ok":
                n = min(len(seq.tokens) - seq.computed, budget)
                work.append((seq, n))
                budget -= n
        seqs = tuple(self._work_item(seq, n, writer) for seq, n in work)
        return ScheduledBatch(n_step, writer, seqs, tuple(preempted), tuple(ended))

    def set_drafts(self, request_id: str, drafts: Sequence[int]) -> None:
        """The MTP layer's draft tokens for the sequence's next step (runtime/speculative.py)."""
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status == "running":
            seq.drafts = tuple(drafts)

    def commit(
        self,
        batch: ScheduledBatch,
        sampled: Mapping[str, int | Sequence[int]],
        discard: Iterable[str] = (),
        mtp_rows: Mapping[str, int] | None = None,
    ) -> list[StepOutput]:
        """Apply a computed batch: ack its writes, verify its loads, advance, append tokens.

        `sampled[request_id]` is the token of every sequence with `sample` set (ignored for
        requests aborted since `step`); for a sequence that verified drafts, the list of its
        accepted drafts then the token sampled after them: only the accepted positions
        advance, the rejected drafts' rows lie past `computed` (dead: never read before a later
        step rewrites them; never committed to a tier). `mtp_rows[request_id]`: the MTP
        layer's rows [0, n) valid after the step's draft pass (absent: it wrote none; rows past
        the accepted length are dropped). Returns one StepOutput per new token.
        `discard`: sequences whose computation this step read untrustworthy KV (integrity): their
        positions do not advance, nothing is appended, and they are preempted to recompute.
        """
        discard = set(discard)
        for slot in self._writes.pop(batch.writer, []):
            self.alloc.end_write(slot, batch.writer)
        self.tiers.wait_loads(sorted({s for w in batch.seqs for s in w.page_table}))
        rolled = self._roll_back(self.tiers.poll())
        out: list[StepOutput] = []
        ps = self.page_size
        for w in batch.seqs:
            seq = self._seqs.get(w.request_id)
            if seq is None or seq.status != "running" or seq.request_id in rolled:
                continue
            if seq.request_id in discard:
                self._preempt(seq)
                continue
            assert seq.computed == w.start
            seq.drafts = ()
            got = sampled[seq.request_id] if w.sample else ()
            tokens = [got] if isinstance(got, int) else list(got)
            assert len(tokens) <= w.n_draft + 1 and (tokens or not w.sample)
            reason, emitted = None, []
            for token in tokens:  # accepted drafts, then the sampled token
                seq.output.append(token)
                emitted.append(token)
                if token in seq.stop_ids:
                    reason = "stop"
                elif len(seq.output) >= seq.max_new_tokens:
                    reason = "length"
                if reason is not None:
                    break
            # rows of the step's first token and of the accepted drafts are valid
            end = min(w.stop - w.n_draft + max(0, len(tokens) - 1), len(seq.tokens))
            seq.computed = end
            written = (mtp_rows or {}).get(seq.request_id)
            seq.mtp_rows = min(written if written is not None else seq.mtp_rows, end + 1)
            full = [(i, seq.pages[i]) for i in range(w.start // ps, end // ps)]
            self.tiers.commit_pages(seq.request_id, seq.tokens, full)
            if end % ps:
                self.alloc.set_tokens(seq.pages[end // ps], end % ps)
            if reason is not None:
                self._finish(seq, reason)
            for i, token in enumerate(emitted):
                last = i == len(emitted) - 1
                out.append(
                    StepOutput(
                        seq.request_id, token, last and reason is not None, reason if last else None
                    )
                )
        return out

    # ---- internals ----------------------------------------------------------------------------
    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _rows_upto(self, seq: SeqState, n: int, stop: int | None = None) -> int:
        """Positions the step computing `n` new tokens of `seq` (up to `stop`) writes: its
        tokens, then the MTP lookahead, never past the request's last possible position."""
        stop = seq.computed + n if stop is None else stop
        if not self.mtp_lookahead:
            return stop
        # past the last token only the drafts verified there and their MTP rows (dead rows)
        last = len(seq.prompt) + seq.max_new_tokens + self.mtp_lookahead
        if self.max_positions is not None:
            last = min(last, self.max_positions)
        return max(stop, min(stop + self.mtp_lookahead, last))

    def _admit(self, seq: SeqState) -> str:
        """'ok' (running now), 'wait' (its L3 pages are arriving) or 'full' (no room)."""
        tokens, ps = seq.tokens, self.page_size
        max_pages = (len(tokens) - 1) // ps  # always leave a position to compute
        arriving = self.tiers.prefetch(tokens, max_pages, start=not seq.prefetched)
        seq.prefetched = True
        if arriving:
            return "wait"
        hit = self.tiers.acquire(seq.request_id, tokens, max_pages)
        need = self._pages_for(self._rows_upto(seq, 0, len(tokens))) - len(hit.slots)
        if self.alloc.num_free < need:
            self.tiers.evict_l1(need - self.alloc.num_free)
        slots = self.alloc.alloc(seq.request_id, need)
        if slots is None:
            self.tiers.release(seq.request_id)
            return "full"
        self.tiers.confirm(hit)
        seq.pages = hit.slots + slots
        seq.computed = len(hit.slots) * ps
        seq.mtp_rows, seq.drafts = seq.computed, ()  # a prefix's MTP rows are valid
        if seq.cached is None:
            seq.cached = {tier: pages * ps for tier, pages in hit.by_tier.items()}
        seq.status, seq.order = "running", next(self._orders)
        self._waiting.remove(seq)
        self._running.append(seq)
        return "ok"

    def _ensure_pages(self, seq: SeqState, upto: int, work: list, preempted: list) -> bool:
        """Give `seq` pages for positions < `upto`: allocate, evict, wait or preempt.

        False when `seq` must skip this step (frees are in flight, or it was preempted itself).
        """
        scheduled = {s.request_id for s, _ in work}
        while True:
            need = self._pages_for(upto) - len(seq.pages)
            if need <= 0:
                return True
            slots = self.alloc.alloc(seq.request_id, need)
            if slots is not None:
                seq.pages += slots
                return True
            if self.tiers.evict_l1(need - self.alloc.num_free) > 0:
                continue
            if self.tiers.transfers_in_flight:
                return False  # backups / loads will free slots: wait, don't preempt
            # the newest of the others not yet scheduled this step, or `seq` if it is newer
            victims = [s for s in self._running if s.request_id not in scheduled]
            victim = max(victims, key=lambda s: s.order)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is seq:
                return False

    def _preempt(self, seq: SeqState) -> None:
        if self.preempt_mode == "swap":
            self.tiers.backup(seq.pages)
        self.tiers.release(seq.request_id)
        seq.pages, seq.computed, seq.status = [], 0, "waiting"
        seq.prefetched, seq.drafts, seq.mtp_rows = False, (), 0
        seq.preemptions += 1
        self.preemptions += 1
        self._running.remove(seq)
        self._waiting.appendleft(seq)

    def _finish(self, seq: SeqState, reason: str) -> StepOutput:
        if seq.status == "running":
            self.tiers.release(seq.request_id)
            self._running.remove(seq)
        elif seq.status == "waiting":
            self._waiting.remove(seq)
        seq.status, seq.finish_reason, seq.pages = "finished", reason, []
        self._seqs.pop(seq.request_id, None)
        return StepOutput(seq.request_id, None, True, reason)

    def _roll_back(self, failures: list[LoadFailure]) -> set[str]:
        """Sequences that lost a page to a failed load recompute from that page on."""
        bad_slots = {f.slot for f in failures}
        rolled: set[str] = set()
        for rid in sorted({rid for f in failures for rid in f.owners}):
            seq = self._seqs.get(rid)
            if seq is None or seq.status != "running":
                continue
            first = min(i for i, s in enumerate(seq.pages) if s in bad_slots)
            self.rolled_back += [(rid, s) for s in seq.pages if s in bad_slots]
            keep = [s for s in seq.pages[first:] if s not in bad_slots]
            self.tiers.unref(rid, keep)
            seq.pages = seq.pages[:first]
            seq.computed = min(seq.computed, first * self.page_size)
            seq.mtp_rows, seq.drafts = min(seq.mtp_rows, seq.computed), ()
            rolled.add(rid)
        return rolled

    def _work_item(self, seq: SeqState, n: int, writer: str) -> SeqWork:
        start, ps = seq.computed, self.page_size
        known = min(n, len(seq.tokens) - start)  # the rest are drafts
        table = tuple(seq.pages[: self._pages_for(self._rows_upto(seq, n))])
        for slot in table[start // ps :]:
            self.alloc.begin_write(slot, writer)
            self._writes.setdefault(writer, []).append(slot)
        epochs = tuple(self.alloc.epoch_of(s) for s in table)
        tokens = tuple(seq.tokens[start : start + known]) + seq.drafts[: n - known]
        lead = -1
        if self.mtp_lookahead and 0 < start and seq.mtp_rows <= start:
            lead = seq.tokens[start - 1]  # MTP row `start` needs the hidden state at start - 1
        sample = start + known == len(seq.tokens)
        return SeqWork(seq.request_id, start, tokens, table, epochs, sample, n - known, lead)

    # ---- invariants -----------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Tier invariants plus: every running sequence owns exactly its page table. Pure."""
        self.tiers.check_invariants()
        owners = set()
        for seq in self._running:
            assert seq.status == "running"
            assert self.alloc.owned(seq.request_id) == set(seq.pages), seq.request_id
            assert len(set(seq.pages)) == len(seq.pages)
            assert seq.computed <= min(len(seq.tokens), len(seq.pages) * self.page_size)
            owners.add(seq.request_id)
        for seq in self._waiting:
            assert seq.status == "waiting" and not seq.pages
            assert not self.alloc.owned(seq.request_id)
        for rec in self.alloc.records:
            assert rec.owners <= owners, f"slot {rec.slot} owned by a request not running"
            if not self._writes:
                assert not any(str(w).startswith("step#") for w in rec.writers)
