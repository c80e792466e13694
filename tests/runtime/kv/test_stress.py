"""Concurrency stress: a real copy thread and io thread with random delays and reordering,
>= 64 requests with shared prefixes, random aborts and timeouts, an L1 pool far smaller than the
working set so pages churn through L2 and L3. Every completed request's tokens equal what it
gets alone on an idle engine; at the end no page leaked and every refcount is zero."""

from __future__ import annotations

import os
import random
import threading
import time
import zlib

import pytest

from runtime.kv.copy_engine import CopyHooks


@pytest.mark.parametrize("policy", ["write_through", "write_back", "write_through_selective"])
def test_concurrent_churn(sim_cls, tmp_path, policy):
    rng = random.Random(zlib.crc32(policy.encode()))
    lock = threading.Lock()

    def before_step(transfer, step):  # delays on the copy threads
        with lock:
            r = rng.random()
        if r < 0.25:
            time.sleep(r * 0.004)

    def pick(todo):  # and completions out of submission order
        with lock:
            return rng.randrange(len(todo))

    sim = sim_cls(
        page_size=4,
        l1_slots=20,
        l2_slots=24,
        disk_dir=tmp_path,
        disk_pages=400,
        policy=policy,
        threaded=True,
        hooks=CopyHooks(pick=pick, before_step=before_step),
        max_batch_tokens=40,
        max_running=6,
    )
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(12, 28))] for _ in range(6)]
    todo = []
    for i in range(72):
        prompt = prefixes[i % 6] + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 8))]
        timeout = rng.choice([None, None, None, 0.5, 4.0])
        todo.append((f"r{i}", prompt, rng.randrange(1, 12), timeout))
    steps = 0
    t0 = time.monotonic()
    while todo or sim.sched.has_work():
        for _ in range(rng.randrange(0, 3)):
            if todo:
                rid, prompt, max_new, timeout = todo.pop(0)
                assert sim.submit(rid, prompt, max_new, timeout)
        live = [s.request_id for s in sim.sched.running + sim.sched.waiting]
        if live and rng.random() < 0.04:
            sim.abort(rng.choice(live))
        sim.run_step()
        if sim.last_batch.seqs:
            sim.clock.t += 0.05  # time passes with work done, not while waiting on copies
        elif sim.tiers.transfers_in_flight:
            sim.tiers.wait_progress(0.01)
        steps += 1
        if steps % 25 == 0:
            sim.sched.check_invariants()
        assert time.monotonic() - t0 < 60, "stress run did not finish"
    sim.tiers.drain()
    sim.copier.close()
    completed = sim.check_completed()
    sim.check_quiescent()
    stats = sim.tiers.stats()
    reasons = list(sim.reasons.values())
    if os.environ.get("KV_STRESS_VERBOSE"):
        print(policy, completed, stats, {r: reasons.count(r) for r in set(reasons)})
    assert len(reasons) == 72 and completed >= 24
    assert reasons.count("abort") > 0 and reasons.count("timeout") > 0
    assert stats.evictions > 50 and stats.hits["L1"] > 0
    assert stats.hits["L2"] + stats.hits["L3"] > 0, stats
