"""Cross-rank safe reclaim: an aborted sequence's pages are reused on no rank before every rank
has acknowledged the abort and drained its own writers of that sequence.

Under LayerSplit a sequence's work spans ranks: a rank's pages receive rows another rank
computed (prefill gathers to the layer's owner), and a rank that lags (a late step, an async
copy, a send still in flight) may still be writing for a sequence the others already aborted.
The single-process rule (a page with writers in flight stays DRAINING until they ack,
runtime/kv/allocator.py) only sees local writers; this module extends it across ranks.

Protocol (every rank runs it at the same step boundaries; the abort set is agreed first):
  1. abort(seq, slots): each rank registers an *ack marker* writer ("abort-ack", seq) on every
     page of `seq` that is not in its radix tree, then releases the sequence: those pages go
     DRAINING (the allocator keeps a page with a writer DRAINING). Pages in the tree are full
     and immutable (every row landed before they were committed), so they stay CACHED.
  2. local_acks(): at each boundary a rank acks `seq` once it has no writer of `seq` in flight
     (any writer registered through `begin_writer`: steps, late copies, test hooks).
  3. The caller all-reduces MIN over the ack vector (one entry per pending sequence, same order
     on every rank) and calls apply(agreed): for each sequence acked by EVERY rank, the marker
     ends on every page; a page goes FREE (epoch += 1) only when its last writer is gone.

Invariants (tests/runtime/layersplit/test_drain.py attacks them):
  - owner: a page belongs to the sequences in its allocator record (per rank; page tables and
    slot numbers differ between ranks);
  - writer: only the owning sequence's step (or a load into a LOADING page) writes a page, and
    every such writer is registered on the page while in flight;
  - reuse: a page of an aborted sequence is FREE on a rank only after the boundary at which
    every rank acked the abort, and after that rank's own writers of it ended. Hence while any
    rank still has a writer of the sequence in flight, or has not acked, no rank reuses a page.
`unsafe=True` (tests only: the negative control) skips the markers, so each rank frees as soon
as its own writers drained: the single-process rule, which the cross-rank test shows unsafe.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from runtime.kv.allocator import PageAllocator, PageState

ACK = "abort-ack"


class CrossRankDrain:
    """One rank's ledger of aborted sequences waiting for every rank's ack."""

    def __init__(self, alloc: PageAllocator, unsafe: bool = False) -> None:
        self.alloc = alloc
        self.unsafe = unsafe
        # seq -> this rank's slots carrying the seq's ack marker; insertion order is the
        # agreed abort order, identical on every rank (the ack vector's order)
        self.pending: dict[str, list[int]] = {}
        self.writers: dict[str, dict[Hashable, list[int]]] = {}  # seq -> writer -> slots
        self.log: list[tuple[int, str, str, int]] = []  # (boundary, event, seq, slot or -1)
        self.pages_drained = 0  # pages that waited for the ack (DRAINING)
        self.pages_acked = 0  # markers ended after every rank acked
        self.aborts = 0

    # ---- writers of a sequence ---------------------------------------------------------------
    def begin_writer(self, seq: str, writer: Hashable, slots: Iterable[int]) -> None:
        """`writer` of `seq` is in flight on `slots` (this rank's pages)."""
        slots = list(slots)
        for slot in slots:
            self.alloc.begin_write(slot, writer)
        self.writers.setdefault(seq, {})[writer] = slots

    def end_writer(self, seq: str, writer: Hashable, now: int) -> None:
        """`writer` landed. A DRAINING page whose last writer this was goes FREE."""
        slots = self.writers[seq].pop(writer)
        if not self.writers[seq]:
            del self.writers[seq]
        for slot in slots:
            self.alloc.end_write(slot, writer)
            self._note_free(now, seq, slot)
        self.log.append((now, "writer_done", seq, -1))

    def in_flight(self, seq: str) -> int:
        return len(self.writers.get(seq, ()))

    # ---- aborts --------------------------------------------------------------------------------
    def abort(self, seq: str, private_slots: Iterable[int], now: int) -> None:
        """Before the caller releases aborted `seq`: hold its private pages (not in the tree)
        with the ack marker so the release leaves them DRAINING. Same boundary on every rank."""
        self.aborts += 1
        self.log.append((now, "abort", seq, -1))
        if self.unsafe:
            return
        slots = list(private_slots)
        for slot in slots:
            self.alloc.begin_write(slot, (ACK, seq))
        self.pages_drained += len(slots)
        self.pending[seq] = slots

    def released(self, seq: str, private_slots: Iterable[int], now: int) -> None:
        """After the caller released aborted `seq`: log its pages already FREE (none unless
        `unsafe`: the markers keep them DRAINING)."""
        for slot in private_slots:
            self._note_free(now, seq, slot)

    def local_acks(self) -> list[int]:
        """1 per pending sequence (agreed order) once this rank has no writer of it in flight."""
        return [int(self.in_flight(seq) == 0) for seq in self.pending]

    def apply(self, agreed: list[int], now: int) -> list[str]:
        """`agreed` = MIN over ranks of `local_acks()`. Ends the markers of the sequences every
        rank acked; returns them."""
        assert len(agreed) == len(self.pending), "ack vector out of step with the ledger"
        done = []
        for (seq, slots), ok in zip(list(self.pending.items()), agreed, strict=True):
            if not ok:
                continue
            self.log.append((now, "acked", seq, -1))
            for slot in slots:
                self.alloc.end_write(slot, (ACK, seq))
                self.pages_acked += 1
                self._note_free(now, seq, slot)
            del self.pending[seq]
            done.append(seq)
        return done

    def _note_free(self, now: int, seq: str, slot: int) -> None:
        if self.alloc.state(slot) is PageState.FREE:
            self.log.append((now, "free", seq, slot))
