"""Tier controller (HiCache): moves pages L1 <-> L2 <-> L3 and keeps every record in step.

Owns the policy, not the bytes: the allocator (L1 records), the radix tree (where each prefix
page lives), the host pool (L2), the disk store (L3) and the copy engine (asynchronous copies with
fences). Everything runs on the engine thread; the copy engine's workers only move bytes and the
controller applies their results in `poll()`.

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

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import torch

from runtime.kv.allocator import PageAllocator, PageState
from runtime.kv.checksum import page_checksums
from runtime.kv.copy_engine import CopyEngine, Transfer
from runtime.kv.disk_store import DiskStore
from runtime.kv.host_pool import HostPool
from runtime.kv.radix import RadixNode, RadixTree, chain_hash

__all__ = ["WritePolicy", "PrefixHit", "LoadFailure", "TierStats", "TierController"]

DigestFn = Callable[[Mapping[str, torch.Tensor], Sequence[int]], list[dict[str, int]]]


class WritePolicy(StrEnum):
    WRITE_THROUGH = "write_through"
    SELECTIVE = "write_through_selective"
    WRITE_BACK = "write_back"


class PrefixHit(NamedTuple):
    slots: list[int]  # L1 slots of the matched pages, in order; the owner refs each
    by_tier: dict[str, int]  # pages by the tier they were served from
    nodes: list[RadixNode]  # the matched nodes, in order


class LoadFailure(NamedTuple):
    slot: int  # L1 slot whose load failed verification (now FREE or DRAINING)
    owners: frozenset[str]  # requests that lost their reference: they must recompute
    prefix_hash: int


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


@dataclass
class _Op:
    kind: str  # backup | load | write_l3 | read_l3
    nodes: list[RadixNode]
    l1: list[int] = field(default_factory=list)
    l2: list[int] = field(default_factory=list)
    sums: list[dict[str, int]] = field(default_factory=list)  # what the copies must carry
    writer: str = ""
    evict_after: bool = False  # write_l3: drop the L2 copy once the file is written


class TierController:
    def __init__(
        self,
        alloc: PageAllocator,
        tree: RadixTree,
        copier: CopyEngine,
        l1_planes: Mapping[str, torch.Tensor],
        host: HostPool | None = None,
        disk: DiskStore | None = None,
        policy: WritePolicy | str = WritePolicy.WRITE_THROUGH,
        selective_threshold: int = 2,
        verify_loads: bool = True,
        digest_fn: DigestFn = page_checksums,
    ) -> None:
        assert disk is None or host is not None, "L3 is staged through L2: give a host pool"
        self.alloc, self.tree, self.copier = alloc, tree, copier
        self.l1_planes = dict(l1_planes)
        self.host, self.disk = host, disk
        self.policy = WritePolicy(policy)
        self.selective_threshold = selective_threshold
        self.verify_loads = verify_loads
        self.digest_fn = digest_fn
        self._ops: dict[int, _Op] = {}
        self._loading: dict[int, Transfer] = {}  # L1 slot -> load in flight into it
        self._from_l3: set[int] = set()  # host slots whose data came from disk
        self._writers = itertools.count(1)
        self._l2_writebacks = 0  # L3 writes that free their L2 slot when done
        self.evictions = 0
        self.load_failures = 0

    # ---- admission ----------------------------------------------------------------------------
    def prefetch(self, tokens: Sequence[int], max_pages: int) -> int:
        """Start L3 -> L2 reads for the prompt's L3-only pages; returns pages still arriving.

        Probes the disk index past the tree's path (a restart leaves the tree empty) and adds
        L3-only nodes for hits. Stops at the first page with no copy or no free L2 slot.
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
        arriving = 0
        for node in path:
            if node.l1 is not None or self._l2_ready(node):
                continue
            if node.l2 is not None:  # a read or a backup is landing
                arriving += 1
                continue
            if node.l3 is None:
                break
            slots = self._host_alloc(1)
            if slots is None:
                break
            self._read_l3(node, slots[0])
            arriving += 1
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
    def commit_pages(self, owner: str, tokens: Sequence[int], pages: Sequence[tuple[int, int]]):
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

    # ---- eviction -------------------------------------------------------------------------------
    def evict_l1(self, n: int) -> int:
        """Free up to `n` L1 slots from unlocked CACHED pages, LRU first; returns slots freed now.

        `write_back` backs a page without a lower copy up first and frees it when the copy has
        landed (in `poll`). A page whose backup is in flight goes DRAINING, then FREE.
        """
        freed, deferred = 0, []
        for node in self.tree.lru("L1"):
            if freed + len(deferred) >= n:
                break
            rec = self.alloc.records[node.l1]
            if rec.state is not PageState.CACHED or node.evicting:
                continue
            if (
                self.policy is WritePolicy.WRITE_BACK
                and self.host is not None
                and node.l2 is None
                and node.l3 is None
            ):
                deferred.append(node)
                continue
            freed += self._evict_l1_node(node)
        left = self._backup(deferred, evict_after=True)
        if not self._l2_writebacks:  # no L2 room and none coming: drop instead of waiting
            for node in left:
                freed += self._evict_l1_node(node)
        return freed

    @property
    def transfers_in_flight(self) -> int:
        """Transfers not yet applied; while > 0, L1 or L2 slots may still be freed by `poll`."""
        return len(self._ops)

    def _evict_l1_node(self, node: RadixNode) -> int:
        slot = node.l1
        self.tree.set_l1(node, None)
        freed = self.alloc.evict(slot)
        self.evictions += 1
        self.tree.prune(node)
        return int(freed)

    def _host_alloc(self, n: int) -> list[int] | None:
        assert self.host is not None
        if self.host.num_free < n:
            self._evict_l2(n - self.host.num_free)
        return self.host.alloc(n)

    def evict_l2(self, n: int) -> None:
        """Free up to `n` L2 slots, LRU first (`write_back` with a disk writes them to L3 first,
        freeing them when written); copies in use by a transfer are skipped."""
        if self.host is not None:
            self._evict_l2(n)

    def _evict_l2(self, n: int) -> None:
        freed = 0
        for node in self.tree.lru("L2"):
            if freed >= n:
                break
            hs = node.l2
            if not self._l2_ready(node) or self.host.slots[hs].busy or node.pending:
                continue
            if self.policy is WritePolicy.WRITE_BACK and self.disk is not None and node.l3 is None:
                self._write_l3(node, evict_after=True)  # frees the slot when written
                freed += 1
                continue
            self._drop_l2(node)
            freed += 1

    def _drop_l2(self, node: RadixNode) -> None:
        hs = node.l2
        self.tree.set_l2(node, None)
        self.host.free(hs)
        self._from_l3.discard(hs)
        self._sync(node)
        self.tree.prune(node)

    # ---- transfers --------------------------------------------------------------------------
    def _backup(self, nodes: list[RadixNode], evict_after: bool = False) -> list[RadixNode]:
        """Start L1 -> L2 copies of READY/CACHED tree pages with no L2 copy.

        Returns the nodes that got no L2 slot. The L1 page has the copy as a writer in flight.
        """
        if self.host is None:
            return list(nodes)
        todo, left = [], []
        for node in nodes:
            rec = self.alloc.records[node.l1]
            if node.l2 is not None or rec.state not in (PageState.READY, PageState.CACHED):
                continue
            hs = self._host_alloc(1)
            if hs is None:
                left.append(node)
                continue
            todo.append((node, hs[0]))
        if not todo:
            return left
        op = _Op("backup", [n for n, _ in todo], writer=f"backup#{next(self._writers)}")
        for node, hs in todo:
            op.l1.append(node.l1)
            op.l2.append(hs)
            op.sums.append(dict(self.alloc.records[node.l1].checksums))
            self.alloc.begin_write(node.l1, op.writer)
            self.tree.set_l2(node, hs)
            node.pending += 1
            node.evicting = evict_after
        t = self.copier.copy_pages(self.l1_planes, self.host.planes, op.l1, op.l2, "backup")
        self._ops[t.id] = op
        return left

    def _load(self, owner: str, nodes: list[RadixNode]) -> None:
        op = _Op("load", nodes, writer=f"load#{next(self._writers)}")
        op.l1 = self.alloc.begin_load(owner, len(nodes), op.writer)
        assert op.l1 is not None
        for node, slot in zip(nodes, op.l1, strict=True):
            self.tree.set_l1(node, slot)
            self.alloc.set_in_tree(slot, True)
            self.tree.lock(node)
            node.pending += 1  # the caller pinned node.l2 (host busy)
            op.l2.append(node.l2)
            op.sums.append(dict(self.host.slots[node.l2].checksums))
        t = self.copier.copy_pages(self.host.planes, self.l1_planes, op.l2, op.l1, "load")
        for slot in op.l1:
            self._loading[slot] = t
        self._ops[t.id] = op

    def _write_l3(self, node: RadixNode, evict_after: bool = False) -> None:
        hs, key = node.l2, node.hash
        sums = dict(self.host.slots[hs].checksums)
        page = self.host.page(hs)
        self.host.acquire(hs)
        node.pending += 1
        t = self.copier.run_job(lambda: self.disk.put(key, page, sums), "write_l3")
        self._ops[t.id] = _Op("write_l3", [node], l2=[hs], evict_after=evict_after)
        self._l2_writebacks += evict_after

    def _read_l3(self, node: RadixNode, hs: int) -> None:
        self.tree.set_l2(node, hs)
        node.pending += 1
        key, page = node.hash, self.host.page(hs)
        t = self.copier.run_job(lambda: self.disk.get(key, page), "read_l3")
        self._ops[t.id] = _Op("read_l3", [node], l2=[hs])

    # ---- completion -------------------------------------------------------------------------
    def poll(self) -> list[LoadFailure]:
        """Apply every completed transfer; returns loads that failed verification."""
        failures: list[LoadFailure] = []
        for t in self.copier.poll():
            op = self._ops.pop(t.id)
            for node in op.nodes:
                node.pending -= 1
            if op.kind == "backup":
                self._done_backup(op, t)
            elif op.kind == "load":
                failures += self._done_load(op, t)
            elif op.kind == "write_l3":
                self._done_write_l3(op, t)
            else:
                self._done_read_l3(op, t)
        return failures

    def _done_backup(self, op: _Op, t: Transfer) -> None:
        for node, l1, hs, sums in zip(op.nodes, op.l1, op.l2, op.sums, strict=True):
            self.alloc.end_write(l1, op.writer)
            if t.ok:
                self.host.mark_ready(hs, sums)  # the checksum of the L1 data it came from
            else:
                self._drop_l2(node)
            if node.evicting:
                node.evicting = False
                if node.l1 == l1 and self.alloc.state(l1) is PageState.CACHED:
                    self._evict_l1_node(node)
            if t.ok and self.disk is not None and node.l3 is None:
                if self.policy is not WritePolicy.WRITE_BACK:
                    self._write_l3(node)
            self._sync(node)
            self.tree.prune(node)

    def _done_load(self, op: _Op, t: Transfer) -> list[LoadFailure]:
        got = op.sums
        if t.ok and self.verify_loads:
            got = self.digest_fn(self.l1_planes, op.l1)
        failures = []
        for node, l1, hs, want, have in zip(op.nodes, op.l1, op.l2, op.sums, got, strict=True):
            self.host.release(hs)
            self._loading.pop(l1, None)
            if t.ok and have == want:
                self.alloc.finish_load(l1, op.writer, want)
                self._sync(node)
                continue
            self.load_failures += 1
            self.tree.set_l1(node, None)
            _, dropped = self.alloc.finish_load(l1, op.writer, None)
            node.lock_ref -= len(dropped)
            if node.l2 == hs and not self.host.slots[hs].busy:
                self._drop_l2(node)  # the bad copy goes too, never served
            self.tree.prune(node)
            failures.append(LoadFailure(l1, frozenset(dropped), node.hash))
        return failures

    def _done_write_l3(self, op: _Op, t: Transfer) -> None:
        node, hs = op.nodes[0], op.l2[0]
        self.host.release(hs)
        self._l2_writebacks -= op.evict_after
        if t.ok and t.result:
            self.tree.set_l3(node, True)
        if op.evict_after and node.l2 == hs and not self.host.slots[hs].busy:
            self._drop_l2(node)
        self._sync(node)
        self.tree.prune(node)

    def _done_read_l3(self, op: _Op, t: Transfer) -> None:
        node, hs = op.nodes[0], op.l2[0]
        if t.ok and t.result is not None:
            self.host.mark_ready(hs, t.result)
            self._from_l3.add(hs)
        else:  # a miss: the store deleted the file; nothing was served
            self.tree.set_l3(node, False)
            self._drop_l2(node)
        self._sync(node)
        self.tree.prune(node)

    # ---- readers ------------------------------------------------------------------------------
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
    def _l2_ready(self, node: RadixNode) -> bool:
        return node.l2 is not None and self.host.slots[node.l2].state == "READY"

    def _sync(self, node: RadixNode) -> None:
        if node.l1 is not None:
            tiers = {"L1"}
            if self._l2_ready(node):
                tiers.add("L2")
            if node.l3 is not None:
                tiers.add("L3")
            self.alloc.records[node.l1].tiers = tiers

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
