"""L1 page allocator: life cycle, safe reclaim (DRAINING), epochs, the unsafe reproduction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kv.allocator import PageAllocator, PageState

F, W, R, C, D, LD = (
    PageState.FREE,
    PageState.WRITING,
    PageState.READY,
    PageState.CACHED,
    PageState.DRAINING,
    PageState.LOADING,
)


def test_alloc_is_all_or_nothing_and_lowest_first():
    a = PageAllocator(4, 2)
    assert a.alloc("r1", 5) is None and a.num_free == 4
    assert a.alloc("r1", 3) == [0, 1, 2]
    assert [a.state(s) for s in range(4)] == [W, W, W, F]
    assert a.owned("r1") == {0, 1, 2}
    a.check_invariants()


def test_release_frees_private_pages_and_caches_tree_pages():
    a = PageAllocator(4, 2)
    s0, s1 = a.alloc("r1", 2)
    a.mark_ready(s0, {"k": 1})
    a.set_in_tree(s0, True)
    e0, e1 = a.epoch_of(s0), a.epoch_of(s1)
    a.release("r1")
    assert a.state(s0) is C and a.epoch_of(s0) == e0
    assert a.state(s1) is F and a.epoch_of(s1) == e1 + 1  # epoch bumps on return to FREE
    a.ref("r2", [s0])  # a prefix hit
    assert a.state(s0) is R and a.records[s0].refcount == 1
    a.unref("r2", [s0])
    assert a.evict(s0) and a.state(s0) is F and a.epoch_of(s0) == e0 + 1
    a.check_invariants()


def test_abort_with_writer_in_flight_drains_until_ack():
    a = PageAllocator(2, 2)
    (slot,) = a.alloc("r1", 1)
    epoch = a.begin_write(slot, "step#1")
    a.abort("r1")
    assert a.state(slot) is D and a.drained == 1
    assert a.alloc("r2", 2) is None  # invariant 1: never handed out while DRAINING
    assert not a.validate(slot, epoch, "r1")  # the owner is gone
    a.check_invariants()
    assert a.end_write(slot, "step#1")  # it landed in the epoch it began in (harmless)
    assert a.state(slot) is F and a.epoch_of(slot) == epoch + 1
    assert a.alloc("r2", 2) is not None
    a.check_invariants()


def test_eviction_during_backup_drains():
    a = PageAllocator(2, 2)
    (slot,) = a.alloc("r1", 1)
    a.mark_ready(slot, {})
    a.set_in_tree(slot, True)
    a.begin_write(slot, "backup#1")  # a copy out of the page
    a.release("r1")
    assert a.state(slot) is C  # a cached page may be backed up while nobody uses it
    assert not a.evict(slot) and a.state(slot) is D
    a.end_write(slot, "backup#1")
    assert a.state(slot) is F


def test_unsafe_reuses_at_once_and_reports_the_late_write():
    a = PageAllocator(2, 2, unsafe=True)
    (slot,) = a.alloc("r1", 1)
    a.begin_write(slot, "step#1")
    a.abort("r1")
    assert a.state(slot) is F  # no drain: the GLM-5 bug
    assert a.alloc("r2", 1) == [slot]  # immediate reuse
    assert not a.end_write(slot, "step#1")  # the late write landed in r2's page
    assert a.late_writes == 1


def test_load_back_paths():
    a = PageAllocator(3, 2)
    s0, s1 = a.begin_load("r1", 2, "load#1")
    for s in (s0, s1):
        a.set_in_tree(s, True)
    assert a.state(s0) is LD and a.records[s0].refcount == 1
    a.check_invariants()
    assert a.finish_load(s0, "load#1", {"k": 5}) == (R, set())
    state, dropped = a.finish_load(s1, "load#1", None)  # failed verification
    assert state is F and dropped == {"r1"} and a.owned("r1") == {s0}
    (s2,) = a.begin_load(None, 1, "load#2")  # a load nobody owns (its requester left)
    a.set_in_tree(s2, True)
    assert a.finish_load(s2, "load#2", {})[0] is C
    a.check_invariants()


def test_check_invariants_catches_damage():
    a = PageAllocator(2, 2)
    (slot,) = a.alloc("r1", 1)
    a.records[slot].state = F
    with pytest.raises(AssertionError):
        a.check_invariants()
    b = PageAllocator(2, 2)
    b.alloc("r1", 1)
    b.records[0].writers["x"] = 0
    b.records[0].owners.clear()
    with pytest.raises(AssertionError):
        b.check_invariants()


OPS = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "write", "ack", "ready", "release", "ref", "evict"]),
        st.integers(0, 3),
        st.integers(0, 7),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_operations_keep_invariants(ops):
    """Random op sequences; the shadow model checks epochs and that drained slots stay out."""
    a = PageAllocator(6, 2)
    writers: dict[int, set[str]] = {}
    n = 0
    for kind, who, x in ops:
        owner = f"r{who}"
        slot = x % a.num_slots
        rec = a.records[slot]
        if kind == "alloc":
            got = a.alloc(owner, 1 + x % 2)
            for s in got or []:
                assert not writers.get(s)  # invariant 1
        elif kind == "write" and rec.state in (W, R, C):
            n += 1
            a.begin_write(slot, f"w{n}")
            writers.setdefault(slot, set()).add(f"w{n}")
        elif kind == "ack" and writers.get(slot):
            epoch = rec.epoch
            a.end_write(slot, writers[slot].pop())
            if rec.state is F:
                assert rec.epoch in (epoch, epoch + 1)
        elif kind == "ready" and rec.state is W and not rec.writers:
            a.mark_ready(slot, {})
            if x % 2:
                a.set_in_tree(slot, True)
        elif kind == "release":
            a.release(owner)
        elif kind == "ref" and rec.state in (R, C) and owner not in rec.owners:
            a.ref(owner, [slot])
        elif kind == "evict" and rec.state is C:
            a.evict(slot)
        a.check_invariants()
