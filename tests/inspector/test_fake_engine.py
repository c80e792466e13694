"""The FakeEngine test double: deterministic, and its page bookkeeping keeps the invariants the
inspector displays (so the TUI tests exercise believable states)."""

from __future__ import annotations

import pytest

from inspector.engine_protocol import EngineProtocol
from runtime.telemetry import PAGE_STATES
from tests.inspector.fake_engine import FakeEngine


def run(engine: FakeEngine) -> list:
    events = []
    while engine.has_work():
        events += engine.step()
    return events


def test_implements_protocol():
    assert isinstance(FakeEngine(), EngineProtocol)


def test_deterministic_for_a_seed():
    def trace(seed):
        engine = FakeEngine(seed=seed)
        engine.submit("one two three " * 10)
        engine.submit(messages=[{"role": "user", "content": "hi"}], max_new_tokens=8)
        return run(engine), engine.snapshot()

    (ev_a, snap_a), (ev_b, snap_b) = trace(3), trace(3)
    assert ev_a == ev_b and snap_a == snap_b
    assert [e.text for e in ev_a] != [e.text for e in trace(4)[0]]


def test_stream_ends_with_one_finished_event_per_request():
    engine = FakeEngine(seed=0)
    rid = engine.submit("hello", max_new_tokens=5)
    events = run(engine)
    assert [e.index for e in events] == list(range(5))
    assert [e.finished for e in events] == [False] * 4 + [True]
    assert events[-1].finish_reason == "length" and events[0].request_id == rid
    assert not engine.step()  # idle: cheap, returns []


def test_pages_after_finish_are_free_or_cached_and_unowned():
    engine = FakeEngine(seed=1)
    for i in range(3):
        engine.submit(f"prompt {i} " * 20)
    run(engine)
    snap = engine.snapshot()
    assert {p.state for p in snap.pages} <= {"FREE", "CACHED"}
    assert all(not p.owners for p in snap.pages)
    cached = [p for p in snap.pages if p.state == "CACHED"]
    assert cached and all(p.checksum and "L2" in p.tiers for p in cached)
    assert snap.radix.nodes == len(cached)
    assert snap.tiers[0].pages_used == len(cached)


def test_concurrent_requests_share_prefix_pages():
    engine = FakeEngine(seed=2)
    prefix = "a long shared system prompt " * 8
    engine.submit(prefix + "first", request_id="a")
    engine.step()
    engine.step()
    engine.submit(prefix + "second", request_id="b")
    engine.step()
    snap = engine.snapshot()
    shared = [p for p in snap.pages if set(p.owners) == {"a", "b"}]
    assert shared
    info = {r.request_id: r for r in snap.requests}
    assert info["b"].cached_tokens["L1"] == len(shared) * snap.page_size
    assert snap.radix.hits_by_tier["L1"] == len(shared)


def test_abort_drains_then_frees_with_a_new_epoch():
    engine = FakeEngine(seed=0)
    rid = engine.submit("x " * 40)
    engine.step()  # prefill writes pages: WRITING
    writing = [p.slot for p in engine.snapshot().pages if p.state == "WRITING"]
    assert writing
    engine.abort(rid)
    snap = engine.snapshot()
    assert all(snap.pages[s].state == "DRAINING" for s in writing)
    engine.step()
    snap = engine.snapshot()
    assert all(snap.pages[s].state == "FREE" and snap.pages[s].epoch == 1 for s in writing)
    assert snap.drained_pages == len(writing)
    assert {r.request_id: r.status for r in snap.requests}[rid] == "aborted"
    assert not engine.has_work()


def test_small_pool_evicts_to_l2_and_spills_to_l3():
    engine = FakeEngine(seed=0, l1_pages=8, l2_pages=4, l3_pages=64)
    for i in range(6):
        engine.submit(f"request number {i} " * 12, max_new_tokens=8)
    run(engine)
    snap = engine.snapshot()
    used = {t.tier: t.pages_used for t in snap.tiers}
    assert snap.evictions > 0 and used["L2"] == 4 and used["L3"] > 0
    assert all(p.state in PAGE_STATES for p in snap.pages)


def test_prefix_hit_from_l2_loads_back():
    engine = FakeEngine(seed=0, l1_pages=8)
    prompt = "remember this prompt " * 12
    engine.submit(prompt, max_new_tokens=4)
    run(engine)
    for i in range(4):  # push the cached pages out of L1
        engine.submit(f"other {i} " * 24, max_new_tokens=4)
        run(engine)
    engine.submit(prompt, max_new_tokens=4, request_id="again")
    engine.step()
    snap = engine.snapshot()
    again = {r.request_id: r for r in snap.requests}["again"]
    assert again.cached_tokens["L2"] + again.cached_tokens["L3"] > 0
    assert any(p.state == "LOADING" for p in snap.pages)


def test_verdicts_and_integrity_events():
    engine = FakeEngine(seed=5, suspect_rate=0.2, corrupt_rate=0.1, inject="checksum", min_reply=40)
    engine.submit("check me " * 5, max_new_tokens=40)
    events = run(engine)
    verdicts = {e.verdict.verdict for e in events}
    assert verdicts == {"ok", "suspect", "corrupt"}
    kinds = {e.kind for e in engine.snapshot().integrity_events}
    assert {"inject", "checksum", "recovery", "shadow", "epoch"} <= kinds
    corrupt = next(e for e in events if e.verdict.verdict == "corrupt")
    assert not corrupt.verdict.epochs_ok and corrupt.verdict.reasons and corrupt.verdict.pages


def test_virtual_clock_gives_exact_rates():
    engine = FakeEngine(seed=0, step_time_s=0.05)
    engine.submit("hi", max_new_tokens=6)
    run(engine)
    info = engine.snapshot().requests[0]
    assert info.ttft_s == pytest.approx(0.05) and info.tok_per_s == pytest.approx(20.0)


def test_bad_requests_raise():
    engine = FakeEngine(l1_pages=2)
    with pytest.raises(ValueError, match="pages"):
        engine.submit("word " * 100)
    with pytest.raises(ValueError, match="exactly one"):
        engine.submit("a", prompt_ids=[1])
    engine.submit("a", request_id="dup", max_new_tokens=4)
    with pytest.raises(ValueError, match="duplicate"):
        engine.submit("b", request_id="dup", max_new_tokens=4)
