"""TierMoves, the base of `TierController`: eviction and the asynchronous copies between L1, L2
and L3, and their results.

Its subclass is runtime/kv/tier_controller.py. It holds the shared state (the
allocator, the radix tree, the host pool, the disk store, the copy engine, the transfers in
flight) and every operation that moves a page between tiers:
- eviction: `evict_l1` (LRU unlocked CACHED pages; `write_back` backs a page up to L2 first and
  frees it when the copy landed), `evict_l2` (`write_back` with a disk writes it to L3 first);
- transfers: L1 -> L2 backup (the L1 page has the copy as a writer in flight), L2 -> L1 load
  (LOADING slots, one fence per layer), L2 -> L3 write and L3 -> L2 read (io worker);
- `poll`: applies completed transfers on the engine thread. A backed-up copy carries the
  checksum of the L1 data it came from (invariant 4); a loaded page is verified against the
  checksum its copy carries and on a mismatch the page and the bad copy are dropped and the
  owners are reported (`LoadFailure`) to recompute: a bad copy is never served.
"""

from __future__ import annotations

import itertools
from collections import deque
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
from runtime.kv.radix import RadixNode, RadixTree

__all__ = ["WritePolicy", "LoadFailure", "TierMoves", "DigestFn"]

DigestFn = Callable[[Mapping[str, torch.Tensor], Sequence[int]], list[dict[str, int]]]


class WritePolicy(StrEnum):
    WRITE_THROUGH = "write_through"
    SELECTIVE = "write_through_selective"
    WRITE_BACK = "write_back"


class LoadFailure(NamedTuple):
    slot: int  # L1 slot whose load failed verification (now FREE or DRAINING)
    owners: frozenset[str]  # requests that lost their reference: they must recompute
    prefix_hash: int


@dataclass
class _Op:
    kind: str  # backup | load | write_l3 | read_l3
    nodes: list[RadixNode]
    l1: list[int] = field(default_factory=list)
    l2: list[int] = field(default_factory=list)
    sums: list[dict[str, int]] = field(default_factory=list)  # what the copies must carry
    writer: str = ""
    evict_after: bool = False  # write_l3: drop the L2 copy once the file is written


class TierMoves:
    """Shared state plus eviction, transfers and their completion (see module doc)."""

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
        self.failed_loads: deque[tuple[int, int]] = deque(maxlen=1024)  # (transfer id, L1 slot)

    # ---- eviction -------------------------------------------------------------------------------
    def evict_l1(self, n: int) -> int:
        """Free up to `n` L1 slots from unlocked CACHED pages, LRU first; returns slots freed now.

        `write_back` backs a page without a lower copy up first and frees it when the copy has
        landed (in `poll`). A page whose backup is in flight goes DRAINING, then FREE.
        """
        freed, draining, deferred = 0, 0, []
        for node in self.tree.lru("L1"):
            if freed + draining + len(deferred) >= n:
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
            now = self._evict_l1_node(node)  # 0: DRAINING until its backup lands
            freed += now
            draining += 1 - now
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

    def _drop_l2(self, node: RadixNode, prune: bool = True) -> None:
        hs = node.l2
        self.tree.set_l2(node, None)
        self.host.free(hs)
        self._from_l3.discard(hs)
        self._sync(node)
        if prune:
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
            self._sync(node)
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
        t = self.copier.run_job(lambda: self.disk.get(key, page), "read_l3", tag=key)
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
            self.failed_loads.append((t.id, l1))
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
