"""One rank's page tables: prefix reuse agreed across ranks, allocation, commits, validation.

Each rank allocates its own pages for every sequence from its own allocator, so page tables,
slot numbers and epochs differ between ranks; positions are the only shared coordinates. A
rank's page of a sequence holds that sequence's `page_size` positions for the rank's owned
layers only.

Admission of a prompt of L tokens (collective: every rank, same order):
  1. local lookup: L3-only prefix pages are read into L2 (waited for, verified), then the tier
     controller references the longest usable prefix (L1 pages referenced, L2 pages loaded into
     L1; the loads are waited for and verified here, so a bad copy is a miss before anyone
     reads it) of at most (L - 1) // page_size pages: at least one prompt token is computed;
  2. agreement: all-reduce MIN of each rank's usable page count -> m. Every rank reuses exactly
     m pages (its own copies) and the context-parallel prefill starts at m * page_size on every
     rank; a rank's extra matched pages are released;
  3. every rank allocates fresh pages for the rest (prompt + max_new tokens); all-reduce MIN of
     "it fit" (with the tier each reused page came from: the slowest over ranks is reported). If
     any rank lacks room, every rank releases and the prompt waits.
A rank that owns no layers stores nothing and never limits the agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from runtime.errors import KvscopeError
from runtime.kv.pool import token_rows
from runtime.kv.tier_controller import PrefixHit
from runtime.layersplit.collective import Collective
from runtime.layersplit.drain import CrossRankDrain
from runtime.layersplit.rank_tiers import TIERS, RankTiers


@dataclass(eq=False)
class RankSeq:
    """One sequence as this rank sees it (prompt index and tokens are the same on every rank)."""

    index: int
    prompt: list[int]
    max_new: int
    deadline: float | None = None  # time.monotonic() after which it times out (local clock)
    abort_after: int | None = None  # explicit abort once it generated this many tokens
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    logits: list[torch.Tensor] = field(default_factory=list)  # [V] per generated token
    slots: list[int] = field(default_factory=list)  # this rank's page table
    epochs: list[int] = field(default_factory=list)  # epoch captured per page (invariant 3)
    rows: torch.Tensor | None = None  # [capacity] this rank's flat pool row per position
    stored: int = 0  # positions whose planes are in the pages
    committed: int = 0  # leading pages committed to the tree (full, READY)
    cached: int = 0  # prompt tokens reused (agreed, page aligned)
    cached_local: dict[str, int] = field(default_factory=dict)  # this rank's tiers served them
    cached_slowest: dict[str, int] = field(default_factory=dict)  # slowest tier over ranks
    finish_reason: str | None = None

    @property
    def sid(self) -> str:
        return f"seq{self.index}"

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)


class RankPages:
    def __init__(self, tiers: RankTiers, coll: Collective, drain: CrossRankDrain) -> None:
        self.t, self.coll, self.drain = tiers, coll, drain
        self.ctl, self.alloc, self.tree = tiers.tiers, tiers.alloc, tiers.tree
        self.ps = tiers.page_size
        self.device = tiers.kv.pool.device
        self.hits = dict.fromkeys(TIERS, 0)  # pages reused, by the tier this rank served
        self.load_failures = 0
        self.now = 0  # the loop's step boundary (for the event log)
        self.events: list[tuple[int, str, str, int]] = []  # (boundary, "alloc", seq, slot)

    # ---- admission (collective) ----------------------------------------------------------------
    def admit(self, seq: RankSeq) -> bool:
        """Agree on the reused prefix and allocate this rank's pages; False (on every rank)
        when some rank has no room now."""
        ps, prompt, sid = self.ps, seq.prompt, seq.sid
        limit = (len(prompt) - 1) // ps
        src = self._sources(prompt, limit)
        hit, epochs = self._acquire(sid, prompt, limit)
        local = len(hit) if self.t.layers else limit
        m = self.coll.min([local])[0]
        keep = min(m, len(hit))
        self.ctl.unref(sid, hit[keep:])
        need = math.ceil((len(prompt) + seq.max_new) / ps)
        fresh = self._alloc(sid, need - keep)
        codes = [TIERS.index(src[i]) if i < keep else 0 for i in range(m)]
        agreed = self.coll.min([int(fresh is not None)] + [-c for c in codes])
        if not agreed[0]:
            self.ctl.release(sid)
            return False
        seq.slots = hit[:keep] + fresh
        self.events += [(self.now, "alloc", sid, slot) for slot in fresh]
        seq.epochs = epochs[:keep] + [self.alloc.epoch_of(s) for s in fresh]
        seq.rows = token_rows(seq.slots, 0, len(seq.slots) * ps, ps).to(self.device)
        seq.tokens = list(prompt)
        seq.cached, seq.stored, seq.committed = m * ps, m * ps, keep
        seq.cached_local = {t: ps * sum(1 for s in src[:keep] if s == t) for t in TIERS}
        slowest = [TIERS[-c] for c in agreed[1:]]
        seq.cached_slowest = {t: ps * slowest.count(t) for t in TIERS}
        if keep:
            nodes = [self.tree.node_of_l1(s) for s in hit[:keep]]
            by_tier = {t: sum(1 for s in src[:keep] if s == t) for t in TIERS}
            self.ctl.confirm(PrefixHit(hit[:keep], by_tier, nodes))
            for t, n in by_tier.items():
                self.hits[t] += n
        return True

    def _sources(self, prompt: list[int], limit: int) -> list[str]:
        """Per prefix page, the tier this rank would serve it from (before any L3 read)."""
        src = []
        for node in self.tree.match(prompt, limit):
            src.append("L1" if node.l1 is not None else "L2" if node.l2 is not None else "L3")
        return src + ["L3"] * (limit - len(src))  # beyond the tree: only the disk can have it

    def _acquire(self, sid: str, prompt: list[int], limit: int) -> tuple[list[int], list[int]]:
        """Local: reference the longest verified prefix; returns its slots and their epochs."""
        if limit == 0 or not self.t.layers:
            return [], []
        ctl = self.ctl
        # L3-only pages are read into L2 (verified by the disk store), and L2 copies still being
        # written (backups just started) are waited for: what a rank reuses does not depend on
        # copy timing
        arriving = ctl.prefetch(prompt, limit)
        while arriving or self._landing(prompt, limit):
            ctl.wait_progress(1.0)
            self._poll()
            arriving = ctl.prefetch(prompt, limit, start=False)
        hit = ctl.acquire(sid, prompt, limit)
        epochs = [self.alloc.epoch_of(s) for s in hit.slots]
        ctl.wait_loads(hit.slots)  # L2 -> L1 loads land and are verified before any read
        self._poll()
        usable = len(hit.slots)
        for i, (slot, ep) in enumerate(zip(hit.slots, epochs, strict=True)):
            if not self.alloc.validate(slot, ep, sid):  # a load failed its checksum: a miss
                usable = i
                break
        held = [s for s in hit.slots[usable:] if sid in self.alloc.records[s].owners]
        self.ctl.unref(sid, held)
        return hit.slots[:usable], epochs[:usable]

    def _landing(self, prompt: list[int], limit: int) -> bool:
        """Some prefix page is only in L2 and its copy there is still landing."""
        host = self.t.host
        return host is not None and any(
            n.l1 is None and n.l2 is not None and host.slots[n.l2].state != "READY"
            for n in self.tree.match(prompt, limit)
        )

    def _alloc(self, sid: str, n: int) -> list[int] | None:
        slots = self.alloc.alloc(sid, n)
        if slots is None:
            self.ctl.evict_l1(n - self.alloc.num_free)
            self._poll()
            slots = self.alloc.alloc(sid, n)
        if slots is None and self.ctl.transfers_in_flight:  # write_back: evictions wait copies
            self.ctl.drain()
            self.ctl.evict_l1(n - self.alloc.num_free)
            slots = self.alloc.alloc(sid, n)
        return slots

    def _poll(self) -> None:
        self.load_failures += len(self.ctl.poll())

    def poll(self) -> None:
        """Apply completed transfers (L2 backups, L3 writes); at each step boundary."""
        self._poll()

    # ---- pages during the run ------------------------------------------------------------------
    def validate(self, seq: RankSeq) -> None:
        """Invariant 3 before a read: every page still has the epoch captured when it joined the
        page table and `seq` still owns it."""
        for i, (slot, ep) in enumerate(zip(seq.slots, seq.epochs, strict=True)):
            if not self.alloc.validate(slot, ep, seq.sid):
                raise KvscopeError(
                    f"rank {self.t.rank}: {seq.sid} page {i} (slot {slot}) failed validation: "
                    f"epoch {ep} -> {self.alloc.epoch_of(slot)}, owners "
                    f"{sorted(self.alloc.records[slot].owners)}"
                )

    def page_of(self, seq: RankSeq, pos: int) -> int:
        return seq.slots[pos // self.ps]

    def commit_full(self, seq: RankSeq) -> None:
        """Commit the pages filled since the last commit (checksums, READY, radix tree, and the
        write policy's L2/L3 backups). No writer may be in flight on them."""
        full = seq.stored // self.ps
        if full > seq.committed:
            pages = [(i, seq.slots[i]) for i in range(seq.committed, full)]
            self.ctl.commit_pages(seq.sid, seq.tokens, pages)
            seq.committed = full

    def finish(self, seq: RankSeq) -> None:
        """A finished sequence lets go of its pages (tree pages stay CACHED)."""
        self.ctl.release(seq.sid)

    def abort(self, seq: RankSeq, now: int) -> None:
        """Aborted (explicit or timeout): private pages DRAINING until every rank acked."""
        if not seq.slots:
            self.drain.aborts += 1
            return
        recs = self.alloc.records
        private = [s for s in seq.slots if not recs[s].in_tree and seq.sid in recs[s].owners]
        self.drain.abort(seq.sid, private, now)
        self.ctl.release(seq.sid)
        self.drain.released(seq.sid, private, now)
