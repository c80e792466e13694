"""ExpertCache on CPU with a fake store: eviction policies, pins, overflow, background prefetch
(the worker thread stands in for the CUDA copy stream), CPU compute of cold experts, telemetry."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.weights.expert_cache import ExpertCache, LayerExperts
from runtime.weights.expert_store import ExpertStore
from runtime.weights.quant import ExpertFormat

D, I, E = 4, 2, 6
FMT = ExpertFormat("none", torch.float32, D, I)


class FakeStore(ExpertStore):
    """Expert (layer, e) has every gate_up entry == 100 * layer + e. ``gate`` (an Event) blocks
    reads until set, to hold a prefetch in flight."""

    tier = "fake"

    def __init__(self, gate: threading.Event | None = None):
        super().__init__(FMT, E)
        self.gate = gate
        self.reads: list[tuple[int, int]] = []

    def record(self, layer, e):
        if self.gate is not None:
            self.gate.wait(5)
        self.reads.append((layer, e))
        v = float(100 * layer + e)
        return {"gate_up": torch.full((2 * I, D), v), "down": torch.full((D, I), -v)}


def _cache(capacity, store=None, **kw):
    return ExpertCache(store or FakeStore(), capacity, torch.device("cpu"), 3, [1, 2], **kw)


def _use(cache, layer, experts):
    got = cache.acquire(layer, experts, [1] * len(experts))
    for e in experts:
        gu, dn = got.weights[e]
        assert (gu == 100 * layer + e).all() and (dn == -(100 * layer + e)).all()
    cache.release(got)
    return got


def _resident(cache):
    return sorted(k for k in cache._slot_key if k is not None)


def test_lru_evicts_the_least_recently_used():
    c = _cache(2)
    _use(c, 1, [0])
    _use(c, 1, [1])
    _use(c, 1, [0])  # hit: 0 becomes the most recent
    _use(c, 1, [2])  # evicts 1
    assert _resident(c) == [(1, 0), (1, 2)]
    s = c.stats()
    assert s.hits[1][0] == 1 and s.misses[1][:3] == (1, 1, 1) and s.total_misses == 3
    assert s.hits[0] == () and len(s.hits) == 3  # dense layer 0: empty row
    assert s.loads == 3 and s.bytes_transferred == 3 * FMT.nbytes
    assert s.heat == s.hits


def test_lfu_keeps_the_frequently_used():
    c = _cache(2, policy="lfu")
    for _ in range(3):
        _use(c, 2, [0])
    _use(c, 2, [1])
    _use(c, 2, [2])  # evicts 1 (used once), not 0 (used three times)
    assert _resident(c) == [(2, 0), (2, 2)]
    _use(c, 2, [3])  # evicts 2
    assert _resident(c) == [(2, 0), (2, 3)]


def test_pinned_slots_survive_and_overflow_is_streamed():
    c = _cache(2)
    got = c.acquire(1, [0, 1, 2], [3, 1, 1])  # three experts, two slots
    assert len(got.slots) == 2 and set(got.weights) == {0, 1, 2}
    for e in (0, 1, 2):
        assert (got.weights[e][0] == 100 + e).all()
    assert c.prefetch(2, [4]) == 0  # every slot pinned: the prefetch is refused
    c.release(got)
    assert c.stats().streamed == 1 and c.stats().total_misses == 3
    assert c.prefetch(2, [4]) == 1


def test_prefetch_in_flight_is_waited_for():
    gate = threading.Event()
    store = FakeStore(gate)
    c = _cache(3, store)
    assert c.prefetch(1, [5]) == 1  # the worker blocks in record() until the gate opens
    assert (1, 5) not in store.reads
    timer = threading.Timer(0.2, gate.set)
    timer.start()
    _use(c, 1, [5])  # waits for the copy, then reads the right bytes
    s = c.stats()
    assert s.hits[1][5] == 1 and s.total_misses == 0
    assert s.prefetch_issued == 1 and s.prefetch_useful == 1 and s.prefetch_late == 1
    c.close()


def test_prefetch_never_evicts_pinned_or_just_predicted():
    c = _cache(3)
    got = c.acquire(1, [0, 1], [1, 1])
    assert c.prefetch(2, [3, 4, 5]) == 1  # one free slot
    c.drain()
    c.release(got)
    assert _resident(c) == [(1, 0), (1, 1), (2, 3)]
    _use(c, 2, [4])  # a miss evicts the LRU (1, 0), not the prefetched (2, 3)
    assert (2, 3) in _resident(c) and (1, 0) not in _resident(c)
    _use(c, 2, [3])
    s = c.stats()
    assert s.prefetch_useful == 1 and s.prefetch_wasted == 0
    c.close()


def test_cpu_compute_serves_cold_experts_from_the_store():
    store = FakeStore()
    c = _cache(1, store, cpu_compute=True)
    _use(c, 1, [2])
    s = c.stats()
    assert s.cpu_computed == 1 and s.loads == 0 and s.resident == 0 and s.misses[1][2] == 1


def test_look_ahead_prediction_is_scored():
    c = _cache(4)
    cur, nxt = LayerExperts(c, 1), LayerExperts(c, 2)

    class Router:  # predicts experts 1 and 2 for every token
        def __call__(self, x):
            return torch.ones(x.shape[0], 2), torch.tensor([[1, 2]] * x.shape[0])

    cur.next = (nxt, Router())
    got = cur.acquire([0], [1])
    cur.prefetch_next(torch.zeros(3, D))
    cur.release(got)
    c.drain()
    assert nxt.predicted == {1, 2}
    got = nxt.acquire([2, 3], [1, 1])
    nxt.release(got)
    s = c.stats()
    assert (s.predicted, s.predicted_used, s.used) == (2, 1, 2)
    assert s.prefetch_accuracy == pytest.approx(0.5) and s.prefetch_recall == pytest.approx(0.5)
    assert s.hits[2][2] == 1 and s.misses[2][3] == 1 and s.prefetch_useful == 1
