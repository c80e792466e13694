"""Scheduler + tiers end to end on the simulated engine (exact KV oracle), deterministic cases."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.kv.allocator import PageState


def prompts(seed: int, n: int, shared: int = 3):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(6, 16))] for _ in range(shared)]
    return [
        prefixes[i % shared] + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 6))]
        for i in range(n)
    ]


def test_chunked_prefill_and_decode(sim_cls):
    sim = sim_cls(max_batch_tokens=5, page_size=4)
    prompt = list(range(1, 18))  # 17 tokens: 4 prefill steps of <= 5 positions
    assert sim.submit("a", prompt, 4)
    spans = []
    while sim.sched.has_work():
        batch = sim.sched.step()
        spans += [(w.start, w.stop, w.sample) for w in batch.seqs]
        sampled, _ = sim.forward(batch)
        sim._record(sim.sched.commit(batch, sampled))
        sim.sched.check_invariants()
    assert spans[:4] == [(0, 5, False), (5, 10, False), (10, 15, False), (15, 17, True)]
    assert all(stop - start == 1 for start, stop, _ in spans[4:])
    assert sim.outputs["a"] == sim.reference(prompt, 4)
    sim.check_quiescent()


def test_prefix_pages_are_shared_and_counted(sim_cls):
    sim = sim_cls(page_size=4)
    base = list(range(1, 13))  # 3 full pages
    sim.submit("a", base + [20, 21], 2)
    sim.run_until_idle()
    sim.submit("b", base + [30], 2)
    batch = sim.sched.step()
    (w,) = batch.seqs
    assert w.start == 12  # three pages reused, the rest computed
    assert sim.sched.get("b").cached == {"L1": 12, "L2": 0, "L3": 0}
    assert all(sim.alloc.state(s) is PageState.READY for s in w.page_table[:3])
    sampled, _ = sim.forward(batch)
    sim._record(sim.sched.commit(batch, sampled))
    sim.run_until_idle()
    assert sim.check_completed() == 2
    sim.check_quiescent()


def test_concurrent_requests_share_pages_with_refcounts(sim_cls):
    sim = sim_cls(page_size=2, max_batch_tokens=64)
    base = [5, 6, 7, 8]
    sim.submit("a", base + [1], 3)
    sim.run_step()  # a's two full pages join the tree
    sim.submit("b", base + [2], 3)
    sim.run_step()
    a, b = sim.sched.get("a"), sim.sched.get("b")
    assert a.pages[:2] == b.pages[:2]
    assert all(sim.alloc.records[s].refcount == 2 for s in a.pages[:2])
    assert all(sim.tree.node_of_l1(s).lock_ref == 2 for s in a.pages[:2])
    sim.run_until_idle()
    assert sim.check_completed() == 2
    sim.check_quiescent()


@pytest.mark.parametrize("preempt", ["recompute", "swap"])
def test_preemption_under_page_pressure(sim_cls, preempt):
    sim = sim_cls(page_size=2, l1_slots=14, l2_slots=16, max_running=6, preempt=preempt)
    for i, p in enumerate(prompts(1, 12)):
        sim.submit(f"r{i}", p, 8)
    sim.run_until_idle()
    assert sim.sched.preemptions > 0
    assert sim.check_completed() == 12
    if preempt == "swap":
        assert sim.tree.hits["L2"] > 0
    sim.check_quiescent()
    sim.close()


def test_timeout_and_abort_release_pages(sim_cls):
    sim = sim_cls(page_size=2)
    assert sim.submit("slow", list(range(1, 9)), 20, timeout_s=5.0)
    assert sim.submit("gone", list(range(1, 9)), 20)
    sim.submit("late", [9, 9, 9], 3, timeout_s=1.0)
    sim.run_step()
    sim.abort("gone")
    sim.clock.t = 5.0
    sim.run_until_idle()
    assert sim.reasons == {"slow": "timeout", "gone": "abort", "late": "timeout"}
    sim.check_quiescent()
    assert sim.alloc.owned("slow") == set()


def test_abort_mid_step_drains_until_commit(sim_cls):
    """The incident's bug 1, protections on: a timed-out request's pages are not reused while
    the step that writes them is in flight; the late write lands in a DRAINING page."""
    sim = sim_cls(page_size=2, l1_slots=6)
    sim.submit("a", [1, 2, 3, 4, 5, 6, 7], 3)
    batch = sim.sched.step()
    written = sim.sched._writes[batch.writer]
    sim.abort("a")  # timeout fires while the forward runs
    assert all(sim.alloc.state(s) is PageState.DRAINING for s in written)
    probe = sim.alloc.alloc("probe", sim.alloc.num_free)
    assert not set(probe) & set(written)  # invariant 1
    sim.alloc.release("probe")
    sim.forward(batch)  # the late write lands
    sim.sched.commit(batch, {"a": 1})
    assert all(sim.alloc.state(s) is PageState.FREE for s in written)
    sim.check_quiescent()


def test_unsafe_reuses_a_page_under_a_late_write(sim_cls):
    """--unsafe: no drain; the slot is reused at once and the late write is detected."""
    sim = sim_cls(page_size=2, l1_slots=4, unsafe=True)
    sim.submit("a", [1, 2, 3], 3)
    batch = sim.sched.step()
    table = batch.seqs[0].page_table
    sim.abort("a")
    assert all(sim.alloc.state(s) is PageState.FREE for s in table)
    assert set(sim.alloc.alloc("b", 2)) == set(table)  # handed out again at once
    sim.forward(batch)
    sim.sched.commit(batch, {})
    assert sim.alloc.late_writes >= 1


def test_corrupt_l2_copy_is_never_served(sim_cls):
    sim = sim_cls(page_size=2, l1_slots=8, l2_slots=16)
    base = list(range(1, 9))
    sim.submit("a", base + [40], 2)
    sim.run_until_idle()
    sim.tiers.evict_l1(8)  # everything to L2 only
    sim.tiers.drain()
    assert sim.alloc.counts()["CACHED"] == 0
    for t in sim.host.planes.values():
        t.view(torch.int32).bitwise_xor_(1 << 20)  # host-bitflip on every L2 copy
    sim.submit("b", base + [41], 2)
    sim.run_until_idle()
    assert sim.tiers.load_failures > 0 and sim.bad_reads > 0  # read, detected, discarded
    assert sim.check_completed() == 2  # b's tokens equal its reference anyway
    sim.check_quiescent()


def test_l3_restart_serves_prefix_and_rejects_damage(sim_cls, tmp_path):
    base = [((i * 7) % 45) + 1 for i in range(24)]  # 6 pages of 4
    first = sim_cls(l2_slots=8, disk_dir=tmp_path)
    first.submit("a", base + [3], 3)
    first.run_until_idle()
    assert first.disk.num_pages >= 6
    first.close()

    second = sim_cls(l2_slots=8, disk_dir=tmp_path)  # a new process, same directory
    second.submit("b", base + [3], 3)
    second.run_until_idle()
    assert second.cached["b"]["L3"] == 24
    assert second.outputs["b"] == first.outputs["a"]
    second.check_quiescent()
    second.close()

    files = sorted(tmp_path.glob("*.kvp"))
    files[0].write_bytes(files[0].read_bytes()[:-5])  # truncated
    data = bytearray(files[1].read_bytes())
    data[-3] ^= 0x04  # one bit flipped in the payload
    files[1].write_bytes(bytes(data))
    third = sim_cls(l2_slots=8, disk_dir=tmp_path)
    third.submit("c", base + [3], 3)
    third.run_until_idle()
    assert third.outputs["c"] == first.outputs["a"]
    assert third.cached["c"]["L3"] < 24 and third.disk.stats["rejected"] >= 1
    assert third.check_completed() == 1
    third.close()


def test_submit_validation(sim_cls):
    sim = sim_cls(page_size=2, l1_slots=4)
    assert sim.submit("a", [1], 1)
    with pytest.raises(ValueError):
        sim.sched.submit("a", [1], 1)
    with pytest.raises(ValueError):
        sim.sched.submit("b", [], 1)
    with pytest.raises(ValueError):
        sim.sched.submit("c", list(range(1, 8)), 2)  # 9 tokens > 4 pages of 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_tiers_on_cuda(sim_cls, tmp_path, policy):  # pragma: no cover - GPU only
    """L1 on the GPU, pinned L2, copy stream + events, Triton checksums: same exact outputs."""
    sim = sim_cls(
        page_size=4,
        l1_slots=10,
        l2_slots=8,
        disk_dir=tmp_path,
        policy=policy,
        threaded=True,
        device="cuda",
    )
    for i, p in enumerate(prompts(2, 16)):
        sim.submit(f"r{i}", p, 6)
    sim.run_until_idle()
    sim.tiers.evict_l1(10)
    sim.tiers.drain()
    for i, p in enumerate(prompts(2, 6)):
        sim.submit(f"again{i}", p, 6)
    sim.run_until_idle()
    assert sim.check_completed() >= 20
    assert sim.tree.hits["L2"] + sim.tree.hits["L3"] > 0
    sim.check_quiescent()
    sim.close()
