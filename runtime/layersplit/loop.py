"""The step loop every LayerSplit rank runs in lock step: admission, batched greedy decode,
aborts and timeouts, cross-rank drain.

All ranks hold the same request list and take the same decisions in the same order; a decision
that depends on local state is agreed by a collective first (pages.py: reused prefix, room;
here: timeouts and the abort acks, one all-reduce per boundary and only when a request has a
timeout or an abort waits for acks). One iteration = one step boundary b:
  1. apply completed tier transfers; land finished late writers (test hook);
  2. agree: requests to end (explicit abort list: deterministic; timeouts: MAX over ranks) and
     the ack vector of pending aborts (MIN over ranks, runtime/layersplit/drain.py);
  3. end aborted / timed-out requests: their private pages go DRAINING on every rank;
  4. admit waiting requests while fewer than `max_batch` run: agreed prefix reuse, then the
     context-parallel prefill of the rest (its first token); a prompt that does not fit waits;
  5. one decode step for every running sequence together (writers registered on the pages
     they write, validated page tables), then commit full pages and finish the done ones.
The loop ends when nothing waits, runs or drains (identical on every rank).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from runtime.errors import KvscopeError
from runtime.layersplit.collective import Collective
from runtime.layersplit.drain import CrossRankDrain
from runtime.layersplit.pages import RankPages, RankSeq
from runtime.layersplit.worker import RankWorker


@dataclass
class LateWriter:
    """Test hook: an in-flight writer of an aborted sequence on this rank, started at its abort,
    that lands (writes junk into the page) `delay_s` later, then acks."""

    prompt: int
    delay_s: float
    seq: str = ""
    slot: int = -1
    thread: threading.Thread | None = None
    landed: threading.Event = field(default_factory=threading.Event)


class RankLoop:
    def __init__(
        self,
        worker: RankWorker,
        pages: RankPages,
        drain: CrossRankDrain,
        coll: Collective,
        max_batch: int,
        eos_ids=(),
        keep_logits: bool = True,
        late_writers: list[LateWriter] | None = None,
    ) -> None:
        self.w, self.pages, self.drain, self.coll = worker, pages, drain, coll
        self.max_batch = max_batch
        self.eos = set(eos_ids)
        self.keep_logits = keep_logits
        self.late = {lw.prompt: lw for lw in late_writers or ()}
        self.boundary = 0

    def run(self, seqs: list[RankSeq]) -> list[RankSeq]:
        waiting, running = deque(seqs), []
        with torch.inference_mode():
            while waiting or running or self.drain.pending:
                self.pages.now = self.boundary
                self.pages.poll()
                self._land_late_writers()
                self._agree(waiting, running)
                self._admit(waiting, running)
                if running:
                    self._decode(running)
                elif self.drain.pending:
                    time.sleep(0.001)  # only acks left: let the writers land
                self.boundary += 1
        return seqs

    # ---- step parts ----------------------------------------------------------------------------
    def _agree(self, waiting: deque, running: list) -> None:
        live = running + list(waiting)  # same order on every rank
        now, b = time.monotonic(), self.boundary
        explicit = [s.abort_after is not None and s.generated >= s.abort_after for s in live]
        timed = [s.deadline is not None and now > s.deadline for s in live]
        need_agree = any(s.deadline is not None for s in live) or self.drain.pending
        end, acks = explicit, []
        if need_agree:
            keep = [int(not (e or t)) for e, t in zip(explicit, timed, strict=True)]
            agreed = self.coll.min(keep + self.drain.local_acks())
            end = [not k for k in agreed[: len(live)]]
            acks = agreed[len(live) :]
        if self.drain.pending:
            self.drain.apply(acks, b)
        for s, e, x in zip(live, end, explicit, strict=True):
            if not e:
                continue
            s.finish_reason = "abort" if x else "timeout"
            if s in running:
                running.remove(s)
                self._start_late_writer(s)
                self.pages.abort(s, b)
            else:
                waiting.remove(s)
                self.pages.abort(s, b)

    def _admit(self, waiting: deque, running: list) -> None:
        while waiting and len(running) < self.max_batch:
            s = waiting[0]
            if not self.pages.admit(s):
                if not running and not self.drain.pending:
                    raise KvscopeError(
                        f"prompt {s.index} ({len(s.prompt)} + {s.max_new} tokens) does not fit "
                        f"the L1 pool ({self.pages.alloc.num_slots} pages of "
                        f"{self.pages.ps} tokens per rank)"
                    )
                return  # pages come back as running sequences finish or aborts drain
            waiting.popleft()
            self.pages.validate(s)
            writer = ("prefill", s.index)
            fresh = s.slots[s.committed :]
            self.drain.begin_writer(s.sid, writer, fresh)  # gathered rows land in them
            logits = self.w.prefill(s.tokens, s.cached, s.rows)
            self.drain.end_writer(s.sid, writer, self.boundary)
            s.stored = len(s.tokens)
            self._emit(s, logits)
            self.pages.commit_full(s)
            if self._done(s):
                self._finish(s)
            else:
                running.append(s)

    def _decode(self, running: list) -> None:
        b = self.boundary
        writer = ("step", b)
        for s in running:
            self.pages.validate(s)
            self.drain.begin_writer(s.sid, writer, [self.pages.page_of(s, len(s.tokens) - 1)])
        toks = [s.tokens[-1] for s in running]
        pos = [len(s.tokens) - 1 for s in running]
        logits = self.w.decode(toks, pos, [s.rows for s in running])  # [B, V]
        for i, s in enumerate(list(running)):
            self.drain.end_writer(s.sid, writer, b)
            s.stored = pos[i] + 1
            self._emit(s, logits[i])
            self.pages.commit_full(s)
            if self._done(s):
                running.remove(s)
                self._finish(s)

    # ---- helpers -------------------------------------------------------------------------------
    def _emit(self, s: RankSeq, logits: torch.Tensor) -> None:
        s.tokens.append(int(logits.argmax()))
        if self.keep_logits:
            s.logits.append(logits.cpu())

    def _done(self, s: RankSeq) -> bool:
        if s.tokens[-1] in self.eos:
            s.finish_reason = "stop"
        elif s.generated >= s.max_new:
            s.finish_reason = "length"
        return s.finish_reason is not None

    def _finish(self, s: RankSeq) -> None:
        self.pages.finish(s)

    def _start_late_writer(self, s: RankSeq) -> None:
        lw = self.late.get(s.index)
        if lw is None or not s.slots:
            return
        lw.seq, lw.slot = s.sid, self.pages.page_of(s, len(s.tokens) - 1)
        self.drain.begin_writer(lw.seq, ("late", s.index), [lw.slot])
        planes = [t[:, lw.slot] for t in self.w.kv.planes.values()]  # [layers, page, *tail]

        def land() -> None:
            time.sleep(lw.delay_s)
            for t in planes:
                t.fill_(1e4)  # junk: had the page been reused, its new owner reads this
            lw.landed.set()

        lw.thread = threading.Thread(target=land, daemon=True)
        lw.thread.start()

    def _land_late_writers(self) -> None:
        for lw in self.late.values():
            if lw.thread is not None and lw.landed.is_set():
                lw.thread.join()
                lw.thread = None
                self.drain.end_writer(lw.seq, ("late", lw.prompt), self.boundary)
