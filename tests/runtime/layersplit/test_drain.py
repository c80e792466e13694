"""Cross-rank safe reclaim (runtime/layersplit/drain.py).

1. Property / stress, no processes: N simulated ranks, each with its own PageAllocator (slots
   handed out in a rank-specific order) and CrossRankDrain, driven in lock step through random
   admissions, writers starting and landing late, aborts, finishes and step boundaries (the
   ack all-reduce is an element-wise MIN here). After every operation: while any rank still has
   a writer of an aborted sequence in flight, or not every rank has acked its abort, none of its
   pages is FREE or reused on any rank. The unsafe ledger (single-process rule per rank) must
   break that property: the check has teeth.
2. gloo, 3 ranks: aborts and a timeout during a batched run, with a late writer on one rank;
   the drain logs show every page freed only after the agreed ack and after the late write,
   survivors' tokens match one rank, and every page is settled at the end.
"""

from __future__ import annotations

import random

import pytest

from runtime.kv.allocator import PageAllocator, PageState
from runtime.layersplit import run_layer_split
from runtime.layersplit.drain import CrossRankDrain


class World:
    """N ranks' allocators and ledgers driven in lock step, with a ground-truth checker."""

    def __init__(self, n: int, slots: int, seed: int, unsafe: bool) -> None:
        self.rng = random.Random(seed)
        self.ranks = []
        for r in range(n):
            alloc = PageAllocator(slots, 4)
            order = alloc.alloc("init", slots)
            random.Random(seed * 10 + r).shuffle(order)
            alloc.unref("init", order)  # rank-specific slot order: page tables differ
            self.ranks.append((alloc, CrossRankDrain(alloc, unsafe=unsafe)))
        self.live: dict[str, list[list[int]]] = {}  # seq -> per rank its slots
        self.inflight: dict[tuple[int, object], str] = {}  # (rank, writer) -> seq
        self.aborted: dict[str, list[list[tuple[int, int]]]] = {}  # per rank (slot, epoch)
        self.acked: set[str] = set()  # every rank was ready at some boundary (ground truth)
        self.now, self.next_id, self.violations = 0, 0, []

    # ---- operations (each applied on every rank, like the collective loop does) ----------------
    def admit(self) -> None:
        k = self.rng.randint(1, 3)
        if any(a.num_free < k for a, _ in self.ranks):  # agreed: every rank must have room
            return
        seq = f"s{self.next_id}"
        self.next_id += 1
        self.live[seq] = [a.alloc(seq, k) for a, _ in self.ranks]

    def begin_writer(self) -> None:
        if not self.live:
            return
        seq = self.rng.choice(sorted(self.live))
        r = self.rng.randrange(len(self.ranks))
        writer = ("w", self.now, self.rng.random())
        slots = self.rng.sample(self.live[seq][r], self.rng.randint(1, len(self.live[seq][r])))
        self.ranks[r][1].begin_writer(seq, writer, slots)
        self.inflight[(r, writer)] = seq

    def end_writer(self) -> None:
        if not self.inflight:
            return
        (r, writer), seq = self.rng.choice(sorted(self.inflight.items(), key=str))
        del self.inflight[(r, writer)]
        self.ranks[r][1].end_writer(seq, writer, self.now)

    def abort(self) -> None:
        if not self.live:
            return
        seq = self.rng.choice(sorted(self.live))
        tables = self.live.pop(seq)
        self.aborted[seq] = []
        for (alloc, drain), slots in zip(self.ranks, tables, strict=True):
            self.aborted[seq].append([(s, alloc.epoch_of(s)) for s in slots])
            drain.abort(seq, slots, self.now)  # no tree here: every page is private
            alloc.abort(seq)
            drain.released(seq, slots, self.now)

    def finish(self) -> None:
        done = [s for s in sorted(self.live) if s not in self.inflight.values()]
        if done:
            seq = self.rng.choice(done)
            del self.live[seq]
            for alloc, _ in self.ranks:
                alloc.release(seq)

    def boundary(self) -> None:
        for seq in self.aborted:  # ground truth: the ack a correct protocol may give
            if seq not in self.acked and seq not in self.inflight.values():
                self.acked.add(seq)
        vectors = [d.local_acks() for _, d in self.ranks]
        agreed = [min(col) for col in zip(*vectors, strict=True)] if vectors[0] else []
        for _, d in self.ranks:
            d.apply(agreed, self.now)
        self.now += 1

    # ---- the property --------------------------------------------------------------------------
    def check(self) -> None:
        busy = set(self.inflight.values())
        for seq, tables in self.aborted.items():
            if seq in self.acked and seq not in busy:
                continue  # every rank acked and drained: reuse is allowed
            for r, pages in enumerate(tables):
                alloc = self.ranks[r][0]
                for slot, epoch in pages:
                    rec = alloc.records[slot]
                    if rec.state is PageState.FREE or rec.epoch != epoch:
                        self.violations.append((self.now, seq, r, slot))
        for alloc, _ in self.ranks:
            alloc.check_invariants()

    def step(self) -> None:
        op = self.rng.choices(
            [
                self.admit,
                self.begin_writer,
                self.end_writer,
                self.abort,
                self.finish,
                self.boundary,
            ],
            weights=[3, 3, 2, 2, 1, 3],
        )[0]
        op()
        self.check()

    def settle(self) -> None:
        while self.inflight:
            self.end_writer()
            self.check()
        for seq in sorted(self.live):
            self.live.pop(seq)
            for alloc, _ in self.ranks:
                alloc.release(seq)
        for _ in range(2):
            self.boundary()
            self.check()


@pytest.mark.parametrize("n", [2, 3])
def test_no_page_reused_before_every_rank_acked(n):
    aborted = drained = 0
    for seed in range(60):
        w = World(n, slots=12, seed=seed, unsafe=False)
        for _ in range(150):
            w.step()
        w.settle()
        assert not w.violations, w.violations[:3]
        for alloc, drain in w.ranks:  # nothing leaks: every page FREE again, ledger empty
            assert alloc.num_free == alloc.num_slots and not drain.pending
            drained += drain.pages_drained
        aborted += len(w.aborted)
    assert aborted > 100 and drained > 100  # the random runs did exercise the protocol


def test_single_process_rule_is_not_enough_across_ranks():
    """Negative control: freeing once a rank's own writers drained (no cross-rank ack) lets a
    rank reuse a page while another rank still writes for the aborted sequence."""
    hit = 0
    for seed in range(30):
        w = World(3, slots=12, seed=seed, unsafe=True)
        for _ in range(150):
            w.step()
        hit += bool(w.violations)
    assert hit > 0


def test_gloo_aborts_drain_across_ranks(greedy_reference, dsa5):
    """3 ranks, 6 L1 pages each: prompts 0 and 1 fill them; prompt 1 is aborted after 2 tokens
    while rank 1 still has a late writer on its last page (lands 0.2 s later, junk bytes);
    prompt 2 needs all 6 pages, so it can only start once that page is back: after the late
    write landed and every rank acked."""
    page, new = 8, 6
    prompts = [list(range(2, 20)), list(range(30, 47)), list(range(60, 102)), [7, 9], [70, 71]]
    res = run_layer_split(
        dsa5,
        3,
        prompts,
        new,
        page_size=page,
        max_batch=2,
        num_slots=6,
        host_bytes=1 << 20,
        aborts={1: 2, 3: 0},  # prompt 1 after 2 tokens (running), prompt 3 before it starts
        timeout_s=[None, None, None, None, 0.0],  # prompt 4 times out while waiting
        hooks={
            "scramble_slots": True,
            "late_writers": [{"rank": 1, "prompt": 1, "delay_s": 0.2}],
        },
    )
    assert res.finish_reasons == ["length", "abort", "length", "abort", "timeout"]
    for i in (0, 2):  # the survivors, prompt 2 in pages reused after the drain
        assert res.tokens[i] == greedy_reference(dsa5, prompts[i], new, page)[0]
    assert res.tokens[1] == greedy_reference(dsa5, prompts[1], new, page)[0][:2]
    assert res.tokens[3] == [] and res.tokens[4] == []

    logs = res.extra["drain_logs"]

    def when(r: int, event: str) -> list[int]:
        return [b for b, ev, s, _ in logs[r] if ev == event and s == "seq1"]

    # the abort and the agreed ack happen at the same boundary on every rank
    assert all(when(r, "abort") == when(0, "abort") for r in range(3))
    assert all(when(r, "acked") == when(0, "acked") for r in range(3))
    (a,), (k,) = when(0, "abort"), when(0, "acked")
    late = when(1, "writer_done")[-1]
    assert late > a  # the late writer landed some boundaries after the abort...
    assert k >= late  # ...and no rank acked (so none freed) before it landed
    for r in range(3):
        t = res.telemetry[r]
        freed = [(b, slot) for b, ev, s, slot in logs[r] if ev == "free" and s == "seq1"]
        assert freed and all(b >= k for b, _ in freed), (r, freed, k)
        assert len(freed) == t.pages_drained == t.pages_acked == 1  # its one private page
        assert t.aborts == 3  # two explicit aborts and one timeout, on every rank
        # prompt 2 got its pages (the drained one among them) only after the ack
        got = {slot: b for b, ev, s, slot in res.extra["alloc_logs"][r] if s == "seq2"}
        assert len(got) == 6 and min(got.values()) >= k
        assert all(slot in got for _, slot in freed)
    for states in res.extra["page_states"]:  # settled: nothing DRAINING or WRITING
        assert states["FREE"] + states["CACHED"] == res.extra["num_slots"]
