"""Radix prefix tree over pages: matching, chained hashes, LRU order, pruning."""

from __future__ import annotations

import pytest

from runtime.kv.radix import RadixTree, chain_hash


def build(tree: RadixTree, tokens: list[int], l1_start: int = 0):
    node, out = tree.root, []
    for i, key in enumerate(tree.page_keys(tokens)):
        node = tree.add(node, key)
        tree.set_l1(node, l1_start + i)
        out.append(node)
    return out


def test_chain_hash_is_stable_and_order_sensitive():
    assert chain_hash(0, (1, 2)) == chain_hash(0, (1, 2))
    assert chain_hash(0, (1, 2)) != chain_hash(0, (2, 1))
    assert chain_hash(1, (1, 2)) != chain_hash(0, (1, 2))
    # a fixed value: L3 keys must not change between processes or releases
    assert chain_hash(0, [1, 2, 3, 4]) == 0x2728AB4454AAA05B
    t1, t2 = RadixTree(2), RadixTree(2)
    a, b = build(t1, [5, 6, 7, 8]), build(t2, [5, 6, 7, 8, 9, 9])
    assert [n.hash for n in a] == [n.hash for n in b[:2]]


def test_match_full_pages_only_and_max_pages():
    tree = RadixTree(2)
    build(tree, [1, 2, 3, 4, 5, 6])
    assert len(tree.match([1, 2, 3, 4, 5])) == 2  # the partial page [5] is never cached
    assert len(tree.match([1, 2, 3, 4, 5, 6], max_pages=1)) == 1
    assert len(tree.match([1, 2, 9, 9])) == 1
    assert tree.match([2, 1]) == []
    tree.check_invariants()


def test_lru_deeper_first_locked_excluded_and_prune():
    tree = RadixTree(2)
    a = build(tree, [1, 2, 3, 4, 5, 6])
    b = build(tree, [1, 2, 7, 8], l1_start=10)  # b[0] is a[0] (shared page)
    assert b[0] is a[0] and b[1].l1 == 11
    tree.set_l1(b[0], 0)
    tree.match([1, 2, 3, 4, 5, 6])  # a's path is now the most recent
    order = tree.lru("L1")
    assert order[0] is b[1]  # least recently used
    assert order.index(a[2]) < order.index(a[1]) < order.index(a[0])  # deeper first on ties
    tree.lock(a[2])
    assert a[2] not in tree.lru("L1")
    tree.unlock(a[2])
    for node in (a[2], a[1]):
        tree.set_l1(node, None)
    tree.prune(a[2])  # removes a[2], then a[1] (no copy, no child)
    assert tree.num_nodes == 2 and a[0].children.keys() == {(7, 8)}
    tree.set_l1(a[0], None)
    tree.prune(a[0])  # still has a child: a hole is kept until the child goes
    assert tree.num_nodes == 2
    assert tree.match([1, 2, 7, 8]) == [a[0], b[1]]
    tree.check_invariants()


def test_l2_l3_locations_and_invariants():
    tree = RadixTree(2, root_hash=99)
    (n,) = build(tree, [1, 2])
    assert n.hash == chain_hash(99, (1, 2))
    tree.set_l2(n, 3)
    tree.set_l3(n, True)
    assert n.tiers == ("L1", "L2", "L3") and tree.node_of_l2(3) is n and n.l3 == n.hash
    with pytest.raises(AssertionError):
        tree.set_l2(build(tree, [4, 4])[0], 3)  # one L2 slot, one node
    n.hash ^= 1
    with pytest.raises(AssertionError):
        tree.check_invariants()
