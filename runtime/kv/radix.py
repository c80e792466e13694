"""Radix prefix tree over token pages: which full pages of which prefixes live in which tier.

One node per full page (key = the page's `page_size` token ids); the path root -> node spells a
token prefix. A node records where its page lives: an L1 slot, an L2 host slot, an L3 key (any
subset), a lock count (requests holding its L1 page), an LRU stamp and a hit counter. `hash` is
the chained prefix hash of every token up to and including this page: stable across processes,
it is the page's L3 key. Checksums live with each copy (allocator record, host slot, file
header), not on the node.

Pure bookkeeping on ints: the tier controller (runtime/kv/tier_controller.py) decides what moves
where and keeps the node fields in step with the allocator and the host pool.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["chain_hash", "RadixNode", "RadixTree", "TIERS"]

TIERS = ("L1", "L2", "L3")


def chain_hash(parent: int, page: Sequence[int]) -> int:
    """64-bit hash of (parent prefix hash, page tokens); deterministic across processes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(page)}q", *page))
    return int.from_bytes(h.digest(), "little")


@dataclass(eq=False)
class RadixNode:
    key: tuple[int, ...]  # the page's token ids (root: ())
    parent: RadixNode | None
    hash: int  # chained prefix hash (root: the tree's root hash)
    depth: int  # pages from the root (root: 0)
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    l1: int | None = None  # L1 slot holding the page
    l2: int | None = None  # L2 host slot holding (or receiving) a copy
    l3: int | None = None  # L3 key (== hash) when the disk store holds a copy
    lock_ref: int = 0  # requests holding a reference on the L1 page
    pending: int = 0  # transfers in flight that name this node
    evicting: bool = False  # an L1 eviction waits for this node's backup
    last_access: int = 0
    hits: int = 0
    poisoned: bool = False  # integrity: its bytes (in some tier) cannot be trusted; never served

    @property
    def tiers(self) -> tuple[str, ...]:
        loc = (self.l1, self.l2, self.l3)
        return tuple(t for t, where in zip(TIERS, loc, strict=True) if where is not None)

    def path(self) -> list[RadixNode]:
        """Nodes from the first page down to this one."""
        out: list[RadixNode] = []
        node: RadixNode | None = self
        while node is not None and node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


class RadixTree:
    """Page-granular prefix tree. Every method runs on the engine thread."""

    def __init__(self, page_size: int, root_hash: int = 0) -> None:
        self.page_size = page_size
        self.root = RadixNode(key=(), parent=None, hash=root_hash, depth=0)
        self._clock = itertools.count(1)
        self._by_l1: dict[int, RadixNode] = {}
        self._by_l2: dict[int, RadixNode] = {}
        self.hits = {t: 0 for t in TIERS}  # pages served from each tier
        self.num_nodes = 0

    # ---- lookups (touch LRU stamps, otherwise pure) ----------------------------------------
    def page_keys(self, tokens: Sequence[int], max_pages: int | None = None) -> list[tuple]:
        """The full pages of `tokens` (at most `max_pages`), as node keys."""
        n = len(tokens) // self.page_size
        if max_pages is not None:
            n = min(n, max_pages)
        ps = self.page_size
        return [tuple(tokens[i * ps : (i + 1) * ps]) for i in range(n)]

    def match(self, tokens: Sequence[int], max_pages: int | None = None) -> list[RadixNode]:
        """Longest path of existing nodes spelling a prefix of `tokens`; stamps them (LRU).

        Nodes may live in any tier; the caller decides how far the path is usable.
        """
        node, path = self.root, []
        stamp = next(self._clock)
        for key in self.page_keys(tokens, max_pages):
            node = node.children.get(key)
            if node is None or node.poisoned:
                break
            node.last_access = stamp
            path.append(node)
        return path

    def node_of_l1(self, slot: int) -> RadixNode | None:
        return self._by_l1.get(slot)

    def node_of_l2(self, slot: int) -> RadixNode | None:
        return self._by_l2.get(slot)

    def nodes(self) -> Iterator[RadixNode]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def lru(self, tier: str) -> list[RadixNode]:
        """Nodes with a copy in `tier`, least recently used first, deeper first on ties.

        For "L1" only unlocked nodes are listed. Deeper-first makes leaves go before the
        prefixes they extend (a path is stamped at once on every match).
        """
        if tier == "L1":
            cand = [n for n in self._by_l1.values() if n.lock_ref == 0]
        elif tier == "L2":
            cand = list(self._by_l2.values())
        else:
            cand = [n for n in self.nodes() if n.l3 is not None]
        cand.sort(key=lambda n: (n.last_access, -n.depth))
        return cand

    # ---- mutation ---------------------------------------------------------------------------
    def add(self, parent: RadixNode, key: tuple[int, ...]) -> RadixNode:
        """Child of `parent` for page `key` (created without location if missing); stamped."""
        assert len(key) == self.page_size
        node = parent.children.get(key)
        if node is None:
            node = RadixNode(key, parent, chain_hash(parent.hash, key), parent.depth + 1)
            parent.children[key] = node
            self.num_nodes += 1
        node.last_access = next(self._clock)
        return node

    def set_l1(self, node: RadixNode, slot: int | None) -> None:
        if node.l1 is not None:
            del self._by_l1[node.l1]
        node.l1 = slot
        if slot is not None:
            assert slot not in self._by_l1, f"L1 slot {slot} already names a node"
            self._by_l1[slot] = node

    def set_l2(self, node: RadixNode, slot: int | None) -> None:
        if node.l2 is not None:
            del self._by_l2[node.l2]
        node.l2 = slot
        if slot is not None:
            assert slot not in self._by_l2, f"L2 slot {slot} already names a node"
            self._by_l2[slot] = node

    def set_l3(self, node: RadixNode, present: bool) -> None:
        node.l3 = node.hash if present else None

    def lock(self, node: RadixNode) -> None:
        node.lock_ref += 1

    def unlock(self, node: RadixNode) -> None:
        assert node.lock_ref > 0, "unlock of an unlocked node"
        node.lock_ref -= 1

    def prune(self, node: RadixNode) -> None:
        """Remove `node` and then its ancestors while they hold no copy and nothing names them."""
        while node.parent is not None and self._removable(node):
            parent = node.parent
            del parent.children[node.key]
            node.parent = None
            self.num_nodes -= 1
            node = parent

    def record_hits(self, by_tier: dict[str, int]) -> None:
        for tier, pages in by_tier.items():
            self.hits[tier] += pages

    @staticmethod
    def _removable(node: RadixNode) -> bool:
        return (
            not node.children
            and node.l1 is None
            and node.l2 is None
            and node.l3 is None
            and node.lock_ref == 0
            and node.pending == 0
        )

    # ---- invariants -------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Links, hashes, depth and the slot indexes agree. Pure."""
        count = 0
        for node in self.nodes():
            count += 1
            parent = node.parent
            assert parent is not None and parent.children.get(node.key) is node
            assert node.depth == parent.depth + 1
            assert node.hash == chain_hash(parent.hash, node.key)
            assert node.lock_ref >= 0 and node.pending >= 0
            assert node.lock_ref == 0 or node.l1 is not None, "locked node without an L1 page"
            assert node.l3 is None or node.l3 == node.hash
            if node.l1 is not None:
                assert self._by_l1.get(node.l1) is node
            if node.l2 is not None:
                assert self._by_l2.get(node.l2) is node
            assert not self._removable(node), "a dead node was not pruned"
        assert count == self.num_nodes
        for slot, node in self._by_l1.items():
            assert node.l1 == slot and node.parent is not None
        for slot, node in self._by_l2.items():
            assert node.l2 == slot and node.parent is not None
