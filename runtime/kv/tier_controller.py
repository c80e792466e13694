"""Tier controller (HiCache): which prefix pages a request gets from which tier, and when.

Owns the policy, not the bytes: the allocator (L1 records), the radix tree (where each prefix
page lives), the host pool (L2), the disk store (L3) and the copy engine (asynchronous copies with
fences). Everything runs on the engine thread; the copy engine's workers only move bytes and the
controller applies their results in `poll()`. Eviction and the transfers themselves live in the
base class, runtime/kv/tier_controller_base.py.

Flows:
- `prefetch`: pages of a prompt found only in L3 are read into L2 slots (io worker); admission
  waits for them so a bad file is a miss before anyone reads it.
- `acquire`: the longest usable prefix: L1 pages are referenced, L2 pages are loaded back into
  fresh LOADING slots (one fence per layer; readers call `wait_layer`).
- `commit_pages`: a full page just written gets its checksums, goes READY and joins the tree;
  `write_through` backs it up to L2 now (then L3), `write_through_selective` after N hits,
  `write_back` only when evicted (L1 -> L2, and L2 -> L3 when L2 evicts).
- `poll`: applies completed transfers: acks writers, verifies loaded pages against the checksums
  their copy carries (invariant 4: a mismatch drops the page and the copy, returns a
  `LoadFailure` so the scheduler recomputes; it is never served), finishes deferred evictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from runtime.kv.allocator import PageState
from runtime.kv.radix import RadixNode, chain_hash
from runtime.kv.tier_controller_base import LoadFailure, TierMoves, WritePolicy

__all__ = ["WritePolicy", "PrefixHit", "LoadFailure", "TierStats", "TierController"]


class PrefixHit(NamedTuple):
    slots: list[int]  # L1 slots of the matched pages, in order; the owner refs each
    by_tier: dict[str, int]  # pages by the tier they were served from
    nodes: list[RadixNode]  # the matched nodes, in order


@dataclass(frozen=True)
class TierStats:
    pages_used: dict[str, int]
    pages_total: dict[str, int]
    bytes_used: dict[str, int]
    bytes_total: dict[str, int]
    hits: dict[str, int]
    transfers_in_flight: int
    evictions: int
    drained_pages: int
    load_failures: int


class TierController(TierMoves):
    """The HiCache policy over the tiers: admission, page commits, readers, telemetry."""

    # ---- admission ----------------------------------------------------------------------------
    def prefetch(self, tokens: Sequence[int], max_pages: int, start: bool = True) -> int:
        """Start L3 -> L2 reads for the prompt's L3-only pages; returns pages still arriving.

        Probes the disk index past the tree's path (a restart leaves the tree empty) and adds
        L3-only nodes for hits. Stops at the first page with no copy or no free L2 slot. With
        `start=False` it only counts reads in flight: callers start reads once per admission, so
        two prompts competing for a small L2 cannot evict each other's pages forever.
        """
        if self.disk is None:
            return 0
        path = self.tree.match(tokens, max_pages)
        node = path[-1] if path else self.tree.root
        for key in self.tree.page_keys(tokens, max_pages)[len(path) :]:
            if not self.disk.contains(chain_hash(node.hash, key)):
                break
            node = self.tree.add(node, key)
            self.tree.set_l3(node, True)
            path.append(node)
        arriving, pinned = 0, []
        for node in path:
            if node.l1 is not None:
                continue
            if self._l2_ready(node):  # pinned: reads for later pages must not evict it
                self.host.acquire(node.l2)
                pinned.append(node.l2)
                continue
            if node.l2 is not None:  # a read or a backup is landing
                arriving += 1
                continue
            if node.l3 is None or not start:
                break
            slots = self._host_alloc(1)
            if slots is None:  # L2 is full of this prefix: the rest is recomputed
                break
            self._read_l3(node, slots[0])
            arriving += 1
        for hs in pinned:
            self.host.release(hs)
        return arriving

    def acquire(self, owner: str, tokens: Sequence[int], max_pages: int) -> PrefixHit:
        """Reference the longest usable prefix of `tokens` (at most `max_pages` pages) for `owner`.

        L1 pages (READY, CACHED, LOADING) get a reference and a node lock; L2 pages are loaded
        into new LOADING slots (stopping where L1 has no room). Hits count once the caller
        `confirm`s the hit (an admission that fails for room releases it instead).
        """
        plan: list[tuple[RadixNode, str]] = []
        for node in self.tree.match(tokens, max_pages):
            if node.l1 is not None:
                plan.append((node, "L1"))
            elif self._l2_ready(node):
                plan.append((node, "L2"))
            else:
                break
        for node, src in plan:  # pin the plan: refs lock L1 pages, busy pins L2 copies
            if src == "L1":
                self.alloc.ref(owner, [node.l1])
                self.tree.lock(node)
            else:
                self.host.acquire(node.l2)
        loads = [node for node, src in plan if src == "L2"]
        if loads and self.alloc.num_free < len(loads):
            self.evict_l1(len(loads) - self.alloc.num_free)
        if len(loads) > self.alloc.num_free:
            cut = plan.index((loads[self.alloc.num_free], "L2"))
            self.unref(owner, [n.l1 for n, src in plan[cut:] if src == "L1"])
            for node in loads[self.alloc.num_free :]:
                self.host.release(node.l2)
            plan, loads = plan[:cut], loads[: self.alloc.num_free]
        if loads:
            self._load(owner, loads)
        by_tier = {"L1": 0, "L2": 0, "L3": 0}
        for _, src in plan:
            by_tier[src] += 1
        for node in loads:
            if node.l2 in self._from_l3:
                by_tier["L2"] -= 1
                by_tier["L3"] += 1
        return PrefixHit([node.l1 for node, _ in plan], by_tier, [node for node, _ in plan])

    def confirm(self, hit: PrefixHit) -> None:
        """The hit is used: count it (tree and node hit counters); selective policy backs up
        pages that reached the threshold."""
        self.tree.record_hits(hit.by_tier)
        for node in hit.nodes:
            node.hits += 1
        if self.policy is WritePolicy.SELECTIVE:
            self._backup([n for n in hit.nodes if n.hits >= self.selective_threshold])

    # ---- pages written by the forward ----------------------------------------------------------
    def commit_pages(
        self, owner: str, tokens: Sequence[int], pages: Sequence[tuple[int, int]]
    ) -> None:
        """Full pages `(page index, slot)` of `tokens`, just written by `owner`, in index order.

        Each: checksums -> `mark_ready` -> joins the tree unless another slot already holds
        that page (then it stays private to `owner` and goes FREE on release).
        """
        if not pages:
            return
        sums = self.digest_fn(self.l1_planes, [slot for _, slot in pages])
        for (_, slot), s in zip(pages, sums, strict=True):
            self.alloc.mark_ready(slot, s)
        keys = self.tree.page_keys(tokens, pages[-1][0] + 1)
        adopted = []
        for index, slot in pages:
            parent: RadixNode | None = self.tree.root
            for key in keys[:index]:
                parent = parent.children.get(key)
                if parent is None:  # an earlier page is not in the tree: stay private
                    break
            if parent is None:
                continue
            child = parent.children.get(keys[index])
            if child is not None and child.l1 is not None:  # another slot holds it already
                continue
            child = self.tree.add(parent, keys[index])
            self.tree.set_l1(child, slot)
            self.alloc.set_in_tree(slot, True)
            self.tree.lock(child)
            self._sync(child)
            adopted.append(child)
        if self.policy is WritePolicy.WRITE_THROUGH:
            self._backup(adopted)

    def unref(self, owner: str, slots: Sequence[int]) -> None:
        """`owner` lets go of `slots` (node locks follow the references)."""
        for slot in slots:
            node = self.tree.node_of_l1(slot)
            if node is not None:
                self.tree.unlock(node)
        self.alloc.unref(owner, slots)

    def release(self, owner: str) -> None:
        """A finished, aborted or preempted request lets go of every page (allocator rules)."""
        self.unref(owner, sorted(self.alloc.owned(owner)))

    def backup(self, slots: Sequence[int]) -> None:
        """Copy the tree pages among `slots` to L2 now (swap-out before a preemption)."""
        self._backup([n for s in slots if (n := self.tree.node_of_l1(s)) is not None])

    # ---- readers ------------------------------------------------------------------------------
    def invalidate(self, slots: Sequence[int]) -> int:
        """Integrity recovery: the L1 pages `slots` hold bytes that cannot be trusted. Their
        tree nodes and every descendant (pages computed after them) lose every tier copy, so
        the prefix is recomputed, never served again. Owners keep their references; the pages
        go FREE when the owners leave. Returns how many tree nodes were dropped."""
        todo = [n for n in (self.tree.node_of_l1(s) for s in slots) if n is not None]
        dropped, seen, visited = 0, set(), []
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            visited.append(node)
            node.poisoned = True  # never matched again, whatever copy is still in flight
            todo.extend(node.children.values())
            if node.l1 is not None and node.l1 not in self._loading:
                slot, rec = node.l1, self.alloc.records[node.l1]
                self.tree.set_l1(node, None)
                if rec.state is PageState.CACHED:
                    self.alloc.evict(slot)
                else:
                    self.alloc.set_in_tree(slot, False)
                rec.tiers = {"L1"}
            host_slot = self.host.slots[node.l2] if node.l2 is not None and self.host else None
            if host_slot is not None and host_slot.state == "READY" and not host_slot.busy:
                self._drop_l2(node, prune=False)  # pruned once, at the end
            if node.l3 is not None and self.disk is not None:
                self.disk.delete(node.hash)
                self.tree.set_l3(node, False)
            dropped += 1
        for node in reversed(visited):  # leaves first
            self.tree.prune(node)
        return dropped

    def fence_done(self, slot: int, layer: int) -> bool:
        """Non-blocking: has `layer` of any load into `slot` landed (True when none)?"""
        t = self._loading.get(slot)
        return t is None or t.fences[layer].done()

    def load_transfer(self, slot: int):
        """The L2 -> L1 load in flight into `slot` (a copy_engine `Transfer`), or None."""
        return self._loading.get(slot)

    def load_transfers(self) -> list:
        """Every L2 -> L1 load not yet applied, each once, oldest first."""
        return list({t.id: t for t in self._loading.values()}.values())

    def loads_in_flight(self) -> bool:
        """True while any L2 -> L1 load-back has not been applied (cheap; no locking)."""
        return bool(self._loading)

    def wait_layer(self, slots: Sequence[int], layer: int) -> None:
        """Accessor hook (invariant 2): return once `layer` of every slot in `slots` has landed."""
        for slot in slots:
            t = self._loading.get(slot)
            if t is not None:
                t.wait(layer)

    def wait_loads(self, slots: Sequence[int]) -> None:
        """Block until every load into `slots` has fully landed (before verifying them)."""
        for slot in slots:
            t = self._loading.get(slot)
            if t is not None:
                t.wait_all()

    def wait_progress(self, timeout: float | None = None) -> bool:
        """Block until some transfer completed (for an engine step that had nothing to run)."""
        return self.copier.wait_completion(timeout)

    def drain(self) -> list[LoadFailure]:
        """Finish every transfer (and the ones they trigger) and apply them."""
        failures = []
        while self._ops:
            self.copier.wait_idle()
            failures += self.poll()
        return failures

    # ---- telemetry and invariants ---------------------------------------------------------------
    def stats(self) -> TierStats:
        a, h, d = self.alloc, self.host, self.disk
        page_bytes = sum(
            t[0, 0].numel() * t.element_size() * t.shape[0] for t in self.l1_planes.values()
        )
        used = {"L1": a.num_slots - a.num_free, "L2": 0, "L3": 0}
        total = {"L1": a.num_slots, "L2": 0, "L3": 0}
        bused = {"L1": used["L1"] * page_bytes, "L2": 0, "L3": 0}
        btotal = {"L1": total["L1"] * page_bytes, "L2": 0, "L3": 0}
        if h is not None:
            used["L2"], total["L2"] = h.num_slots - h.num_free, h.num_slots
            bused["L2"], btotal["L2"] = h.bytes_used, h.bytes_total
        if d is not None:
            used["L3"], bused["L3"], btotal["L3"] = d.num_pages, d.bytes_used, d.budget_bytes
            total["L3"] = d.budget_bytes // max(d.page_bytes, 1)
        return TierStats(
            used,
            total,
            bused,
            btotal,
            dict(self.tree.hits),
            len(self._ops),
            self.evictions,
            a.drained,
            self.load_failures,
        )

    def check_invariants(self) -> None:
        """Allocator, tree and host pool invariants, and that they agree with each other. Pure."""
        self.alloc.check_invariants()
        self.tree.check_invariants()
        named_l1, named_l2 = set(), set()
        for node in self.tree.nodes():
            if node.l1 is not None:
                rec = self.alloc.records[node.l1]
                assert rec.in_tree and rec.state in (
                    PageState.READY,
                    PageState.CACHED,
                    PageState.LOADING,
                ), (node.l1, rec.state)
                assert node.lock_ref == rec.refcount, ("lock/ref mismatch", node.l1)
                assert (rec.state is PageState.LOADING) == (node.l1 in self._loading)
                want = {"L1"} | ({"L2"} if self._l2_ready(node) else set())
                assert rec.tiers == want | ({"L3"} if node.l3 is not None else set()), node.l1
                named_l1.add(node.l1)
            if node.l2 is not None:
                assert self.host.slots[node.l2].state != "FREE"
                named_l2.add(node.l2)
        in_tree = {r.slot for r in self.alloc.records if r.in_tree}
        assert in_tree == named_l1, "invariant 5: a cached page is not reachable from the tree"
        if self.host is not None:
            self.host.check_invariants()
            used = {i for i, s in enumerate(self.host.slots) if s.state != "FREE"}
            assert used == named_l2, "an L2 slot is used but named by no node (leak)"
        pending: dict[int, int] = {}
        for op in self._ops.values():
            for node in op.nodes:
                pending[id(node)] = pending.get(id(node), 0) + 1
        for node in self.tree.nodes():
            assert node.pending == pending.get(id(node), 0), "pending count out of sync"
