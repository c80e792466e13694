"""Copy engine: bytes land exactly, per-layer fences, delays and reordering, CPU thread + CUDA."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.kv.copy_engine import CopyEngine, CopyHooks, slot_runs

L = 3


def planes(slots: int, fill: bool, device="cpu", pin=False):
    g = torch.Generator().manual_seed(slots)
    out = {}
    for name, tail in (("latent", (5,)), ("index_k", (2,))):
        t = (
            torch.randn((L, slots, 4, *tail), generator=g)
            if fill
            else torch.zeros(L, slots, 4, *tail)
        )
        out[name] = t.pin_memory() if pin else t.to(device)
    return out


def test_slot_runs():
    assert slot_runs([3, 4, 5, 9], [0, 1, 2, 3]) == [(3, 0, 3), (9, 3, 1)]
    assert slot_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    assert slot_runs([], []) == []


@pytest.mark.parametrize("threaded", [True, False])
def test_copy_lands_every_plane_and_layer(threaded):
    eng = CopyEngine(L, threaded=threaded)
    src, dst = planes(6, True), planes(4, False)
    t = eng.copy_pages(src, dst, [5, 0, 1], [0, 2, 3], "load")
    assert t.wait_all(timeout=10)
    for name in src:
        for s, d in ((5, 0), (0, 2), (1, 3)):
            assert torch.equal(dst[name][:, d], src[name][:, s])
        assert not dst[name][:, 1].any()
    assert eng.poll() == [t] and eng.poll() == []
    eng.close()


def test_fences_are_per_layer_in_order():
    gate = threading.Event()

    def before(t, step):
        if step == 1:
            gate.wait(10)  # layer 1 of the copy is delayed

    eng = CopyEngine(L, hooks=CopyHooks(before_step=before))
    src, dst = planes(2, True), planes(2, False)
    t = eng.copy_pages(src, dst, [0, 1], [0, 1])
    assert t.wait(0, timeout=10)
    assert torch.equal(dst["latent"][0], src["latent"][0])  # layer 0 landed: readable
    assert not t.fences[1].done() and not t.fences[2].done()
    assert not dst["latent"][1].any()  # layer 1 not yet: a reader must wait on its fence
    assert eng.poll() == []
    gate.set()
    assert t.wait(2, timeout=10) and t.done()
    assert torch.equal(dst["latent"], src["latent"])
    eng.close()


def test_pick_hook_reorders_completions():
    order = []
    eng = CopyEngine(1, threaded=False, hooks=CopyHooks(pick=lambda todo: len(todo) - 1))
    jobs = [eng.run_job(lambda i=i: order.append(i) or i) for i in range(4)]
    eng.wait_idle()
    assert order == [3, 2, 1, 0]
    assert [t.result for t in jobs] == [0, 1, 2, 3]
    assert {t.id for t in eng.poll()} == {t.id for t in jobs}


def test_manual_mode_runs_only_when_driven():
    eng = CopyEngine(L, threaded=False)
    src, dst = planes(2, True), planes(2, False)
    a = eng.copy_pages(src, dst, [0], [1])
    b = eng.copy_pages(src, dst, [1], [0])
    assert len(eng.pending()) == 2 and not dst["latent"].any()
    eng.step(1)  # one layer of b
    assert b.fences[0].done() and not a.fences[0].done()
    b.wait(2)  # waiting drives the transfer on the caller's thread
    assert b.done() and not a.done()
    assert eng.poll() == [b]
    assert eng.wait_completion() and eng.poll() == [a]


def test_failed_step_fails_the_transfer_and_releases_readers():
    def boom():
        raise OSError("disk gone")

    eng = CopyEngine(L)
    t = eng.run_job(boom, "read_l3")
    assert t.wait_all(timeout=10) and not t.ok and "disk gone" in t.error

    def before(t, step):
        if step == 1:
            raise RuntimeError("injected")

    eng2 = CopyEngine(L, hooks=CopyHooks(before_step=before))
    c = eng2.copy_pages(planes(1, True), planes(1, False), [0], [0])
    assert c.wait(2, timeout=10) and not c.ok  # every fence released, the transfer failed
    assert eng2.poll() == [c]
    eng.close()
    eng2.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_through_pinned_host():  # pragma: no cover - GPU only
    eng = CopyEngine(L, device="cuda")
    l1 = planes(4, True, device="cuda")
    host = planes(4, False, pin=True)
    back = planes(4, False, device="cuda")
    t = eng.copy_pages(l1, host, [3, 1], [0, 1], "backup")
    assert t.wait_all(timeout=30)
    assert torch.equal(host["latent"][:, 0], l1["latent"][:, 3].cpu())
    t2 = eng.copy_pages(host, back, [0, 1], [2, 0], "load")
    for layer in range(L):
        t2.wait(layer)  # the current stream waits on the layer's event
        assert torch.equal(back["latent"][layer, 2], l1["latent"][layer, 3])
    eng.close()
