"""L1 page allocator: one `PageRecord` per device page slot; who owns it, who writes it, its epoch.

Knows nothing about bytes (the pool, runtime/kv/pool.py, holds those) nor about token prefixes
(the radix tree does). All methods run on the engine thread; none blocks.

Life cycle (docs/architecture.md):

    FREE --alloc--> WRITING --mark_ready--> READY --last owner leaves--> CACHED (in the tree)
      ^                |  abort/release                                     | evict
      |                v                                                    v
      +------- DRAINING (writers in flight) --last writer acks--> FREE <----+
    FREE --begin_load--> LOADING --finish_load ok--> READY (owners) | CACHED (none)
                                 --finish_load bad--> FREE / DRAINING (owners dropped)

Every return to FREE bumps the slot's epoch. A *writer* is any asynchronous agent that can still
touch the slot's bytes: a forward step producing its KV, a load-back copy into it, a backup copy
out of it. Invariants kept here (numbers from ARCHITECTURE.md):
  1. a slot with writers in flight is never FREE, hence never handed out (unless `unsafe`);
  3. `validate(slot, epoch, owner)` is how every read checks the epoch captured at scheduling;
  5. refcount == len(owners) and the owner index matches the records.
`unsafe=True` (fault injection only) frees slots at once even with writers in flight: the GLM-5
use-after-free; `end_write` then reports the late write as landing in a newer epoch.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["PageState", "PageRecord", "PageAllocator"]


class PageState(StrEnum):
    FREE = "FREE"
    WRITING = "WRITING"
    READY = "READY"
    CACHED = "CACHED"
    DRAINING = "DRAINING"
    LOADING = "LOADING"


@dataclass
class PageRecord:
    """Ownership record of one L1 page slot. Mutated only by `PageAllocator`."""

    slot: int
    state: PageState = PageState.FREE
    owners: set[str] = field(default_factory=set)  # request ids; refcount = len(owners)
    epoch: int = 0  # bumped on every return to FREE
    checksums: dict[str, int] | None = None  # plane -> digest, once the page is READY
    writers: dict[Hashable, int] = field(default_factory=dict)  # writer -> epoch at begin
    tiers: set[str] = field(default_factory=set)  # tiers holding a copy ("L1", "L2", "L3")
    in_tree: bool = False  # a radix node names this slot as its L1 copy
    tokens: int = 0  # token slots filled (telemetry)

    @property
    def refcount(self) -> int:
        return len(self.owners)


class PageAllocator:
    """Free-slot stack plus ownership records for `num_slots` L1 page slots."""

    def __init__(self, num_slots: int, page_size: int, unsafe: bool = False) -> None:
        assert num_slots > 0 and page_size > 0
        self.page_size = page_size
        self.unsafe = unsafe
        self.records = [PageRecord(slot) for slot in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))  # stack: pop() gives the lowest first
        self._owned: dict[str, set[int]] = {}
        self._stale: dict[int, dict[Hashable, int]] = {}  # unsafe: writers of freed slots
        self.drained = 0  # pages that went through DRAINING (telemetry)
        self.late_writes = 0  # unsafe: writes that landed in a newer epoch

    # ---- queries (pure) --------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.records)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def state(self, slot: int) -> PageState:
        return self.records[slot].state

    def epoch_of(self, slot: int) -> int:
        return self.records[slot].epoch

    def owned(self, owner: str) -> set[int]:
        """Slots `owner` holds a reference on (a copy)."""
        return set(self._owned.get(owner, ()))

    def validate(self, slot: int, epoch: int, owner: str) -> bool:
        """Invariant 3: a read scheduled at `epoch` for `owner` is still valid. Pure."""
        rec = self.records[slot]
        return rec.epoch == epoch and owner in rec.owners

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in PageState}
        for rec in self.records:
            out[rec.state.value] += 1
        return out

    # ---- allocation ------------------------------------------------------------------------
    def alloc(self, owner: str, n: int) -> list[int] | None:
        """Take `n` FREE slots for `owner` (all or none) -> WRITING, refcount 1, tiers {L1}.

        Never returns a slot with writers in flight (invariant 1; they are DRAINING, not FREE).
        """
        slots = self._take(n)
        if slots is None:
            return None
        for slot in slots:
            self._claim(slot, PageState.WRITING, owner)
        return slots

    def begin_load(self, owner: str | None, n: int, writer: Hashable) -> list[int] | None:
        """Take `n` FREE slots as LOADING targets of `writer` (a copy from L2), all or none.

        `owner` (optional) gets a reference. The caller names the slots in the tree
        (`set_in_tree`) before it returns to the engine loop.
        """
        slots = self._take(n)
        if slots is None:
            return None
        for slot in slots:
            self._claim(slot, PageState.LOADING, owner)
            self.records[slot].writers[writer] = self.records[slot].epoch
        return slots

    def finish_load(
        self, slot: int, writer: Hashable, checksums: dict[str, int] | None
    ) -> tuple[PageState, set[str]]:
        """Ack the load `writer`; `checksums` None means the landed bytes failed verification.

        LOADING + ok  -> READY (owners) or CACHED (no owners, in tree); checksums recorded.
        LOADING + bad -> every owner is dropped (returned so the scheduler rolls them back), the
                         slot leaves the tree and goes FREE, or DRAINING while writers remain.
        DRAINING      -> FREE once no writer remains (the load outlived its owners).
        Returns (new state, dropped owners).
        """
        rec = self.records[slot]
        if writer not in rec.writers:  # unsafe: the slot was recycled under the copy
            self.end_write(slot, writer)
            return rec.state, set()
        self._ack(rec, writer)
        if rec.state is PageState.DRAINING:
            self._maybe_drained(rec)
            return rec.state, set()
        assert rec.state is PageState.LOADING, f"finish_load on {rec.state} slot {slot}"
        if checksums is not None:
            rec.checksums = dict(checksums)
            rec.tokens = self.page_size
            rec.state = PageState.READY if rec.owners else PageState.CACHED
            assert rec.owners or rec.in_tree, "an unowned loaded page must be in the tree"
            return rec.state, set()
        dropped = set(rec.owners)
        for owner in dropped:
            self._unlink(owner, slot)
        rec.owners.clear()
        rec.in_tree = False
        rec.checksums = None
        self._orphan(rec)
        return rec.state, dropped

    # ---- writers ----------------------------------------------------------------------------
    def begin_write(self, slot: int, writer: Hashable) -> int:
        """Register `writer` in flight on `slot`; returns the epoch it captured.

        Allowed on WRITING, READY, CACHED, LOADING pages (never FREE or DRAINING).
        """
        rec = self.records[slot]
        assert rec.state not in (PageState.FREE, PageState.DRAINING), (slot, rec.state)
        assert writer not in rec.writers, f"writer {writer!r} already on slot {slot}"
        rec.writers[writer] = rec.epoch
        return rec.epoch

    def end_write(self, slot: int, writer: Hashable) -> bool:
        """Ack `writer`. True if it landed in the epoch it began in (always, unless `unsafe`).

        A DRAINING slot whose last writer acks goes FREE (epoch += 1).
        """
        rec = self.records[slot]
        if writer not in rec.writers:
            stale = self._stale.get(slot, {})
            assert writer in stale, f"unknown writer {writer!r} on slot {slot}"
            began = stale.pop(writer)
            if not stale:
                self._stale.pop(slot)
            self.late_writes += began != rec.epoch
            return began == rec.epoch
        began = self._ack(rec, writer)
        landed = began == rec.epoch
        if rec.state is PageState.DRAINING:
            self._maybe_drained(rec)
        return landed

    def mark_ready(self, slot: int, checksums: dict[str, int]) -> None:
        """WRITING -> READY: every token slot written, no writer in flight, checksums taken."""
        rec = self.records[slot]
        assert rec.state is PageState.WRITING, (slot, rec.state)
        assert not rec.writers, f"mark_ready with writers in flight on slot {slot}"
        rec.state = PageState.READY
        rec.checksums = dict(checksums)
        rec.tokens = self.page_size

    def set_tokens(self, slot: int, tokens: int) -> None:
        """Telemetry: token slots filled in a WRITING page."""
        self.records[slot].tokens = tokens

    # ---- references -------------------------------------------------------------------------
    def ref(self, owner: str, slots: Iterable[int]) -> None:
        """Add `owner` to READY/CACHED/LOADING pages (a prefix hit). CACHED -> READY."""
        for slot in slots:
            rec = self.records[slot]
            assert rec.state in (PageState.READY, PageState.CACHED, PageState.LOADING), (
                slot,
                rec.state,
            )
            assert owner not in rec.owners, f"{owner} already refs slot {slot}"
            rec.owners.add(owner)
            self._owned.setdefault(owner, set()).add(slot)
            if rec.state is PageState.CACHED:
                rec.state = PageState.READY

    def unref(self, owner: str, slots: Iterable[int]) -> None:
        """Drop `owner` from `slots`; a page left without owners goes to `_orphan`."""
        for slot in slots:
            rec = self.records[slot]
            assert owner in rec.owners, f"{owner} does not ref slot {slot}"
            rec.owners.discard(owner)
            self._unlink(owner, slot)
            if not rec.owners:
                self._orphan(rec)

    def release(self, owner: str) -> None:
        """A finished request lets go of all its pages.

        Unowned pages: READY in the tree -> CACHED; LOADING in the tree stays LOADING; otherwise
        FREE, or DRAINING while writers are in flight (invariant 1).
        """
        self.unref(owner, sorted(self._owned.get(owner, ())))

    def abort(self, owner: str) -> None:
        """An aborted / timed-out request lets go of all its pages (same rules as `release`):
        pages with writers in flight go DRAINING and return to FREE only after every writer acks.
        """
        self.release(owner)

    def set_in_tree(self, slot: int, in_tree: bool) -> None:
        """The radix tree names (True) or stops naming (False) this slot as a node's L1 copy.

        Naming needs a READY or LOADING page. Un-naming a READY page keeps it READY for its
        owners (it goes FREE when they leave); use `evict` for a CACHED page.
        """
        rec = self.records[slot]
        if in_tree:
            assert rec.state in (PageState.READY, PageState.LOADING), (slot, rec.state)
        else:
            assert rec.state is not PageState.CACHED, "use evict() for CACHED pages"
        rec.in_tree = in_tree

    def evict(self, slot: int) -> bool:
        """CACHED -> FREE (True), or DRAINING while a writer (a backup) is in flight (False)."""
        rec = self.records[slot]
        assert rec.state is PageState.CACHED and not rec.owners, (slot, rec.state)
        rec.in_tree = False
        self._orphan(rec)
        return rec.state is PageState.FREE

    # ---- internals --------------------------------------------------------------------------
    def _take(self, n: int) -> list[int] | None:
        assert n >= 0
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def _claim(self, slot: int, state: PageState, owner: str | None) -> None:
        rec = self.records[slot]
        assert rec.state is PageState.FREE, (slot, rec.state)
        assert self.unsafe or not rec.writers
        rec.state = state
        rec.tokens = 0
        rec.checksums = None
        rec.tiers = {"L1"}
        if owner is not None:
            rec.owners.add(owner)
            self._owned.setdefault(owner, set()).add(slot)

    def _unlink(self, owner: str, slot: int) -> None:
        owned = self._owned[owner]
        owned.discard(slot)
        if not owned:
            del self._owned[owner]

    def _ack(self, rec: PageRecord, writer: Hashable) -> int:
        assert writer in rec.writers, f"unknown writer {writer!r} on slot {rec.slot}"
        return rec.writers.pop(writer)

    def _orphan(self, rec: PageRecord) -> None:
        """A page just lost its last owner (or was evicted / failed): decide where it goes."""
        assert not rec.owners
        if rec.in_tree and rec.state in (PageState.READY, PageState.LOADING):
            if rec.state is PageState.READY:
                rec.state = PageState.CACHED
            return
        if rec.writers and not self.unsafe:
            rec.state = PageState.DRAINING
            self.drained += 1
            return
        self._to_free(rec)

    def _maybe_drained(self, rec: PageRecord) -> None:
        if not rec.writers:
            self._to_free(rec)

    def _to_free(self, rec: PageRecord) -> None:
        if rec.writers:  # unsafe only: the writers may still land in the next owner's page
            self._stale.setdefault(rec.slot, {}).update(rec.writers)
            rec.writers = {}
        rec.state = PageState.FREE
        rec.epoch += 1
        rec.in_tree = False
        rec.checksums = None
        rec.tiers = set()
        rec.tokens = 0
        self._free.append(rec.slot)

    # ---- invariants -------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert invariants 1 and 5 (local part) over every record. Pure."""
        free = set(self._free)
        assert len(free) == len(self._free), "slot twice on the free stack"
        owned: dict[str, set[int]] = {}
        for rec in self.records:
            s = rec.state
            assert (s is PageState.FREE) == (rec.slot in free), (rec.slot, s)
            for owner in rec.owners:
                owned.setdefault(owner, set()).add(rec.slot)
            if s is PageState.FREE:
                assert not rec.owners and not rec.in_tree and rec.checksums is None
                assert not rec.writers, f"invariant 1: FREE slot {rec.slot} has writers"
            elif s is PageState.WRITING:
                assert rec.owners and not rec.in_tree and rec.checksums is None, rec
            elif s is PageState.READY:
                assert rec.owners and rec.checksums is not None, rec
            elif s is PageState.CACHED:
                assert not rec.owners and rec.in_tree and rec.checksums is not None, rec
            elif s is PageState.DRAINING:
                assert rec.writers and not rec.owners and not rec.in_tree, rec
            elif s is PageState.LOADING:
                assert rec.writers and rec.in_tree, rec
        assert owned == self._owned, "owner index out of sync with the records"
