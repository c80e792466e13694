"""Each injected fault takes effect whatever the machine's speed, `changed` is compared (never
assumed), and detections are credited per detector (runtime/integrity/ledger.py).

Every kind runs at a low rate on a tiny checkpoint under KV pressure; the figures must not
depend on timing luck: skip-fence holds each load-back until its reader has read (a slow reader
is simulated too), abort-reuse lands its late write just before the new owner reads the rows.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from runtime.engine import Engine, EngineConfig
from runtime.integrity.config import DETECTORS, IntegrityConfig
from runtime.kv.copy_engine import CopyEngine, CopyHooks

PS = 8


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    prefixes = [[rng.randrange(2, 200) for _ in range(24)] for _ in range(6)]
    return [rng.choice(prefixes) + [rng.randrange(2, 200) for _ in range(3)] for _ in range(40)]


def _run(model, prompts, tmp_path, name, unsafe=False, slow_reader=False, l1=14, **ic):
    """The workload under KV pressure: `l1` pages of L1 (10: more load-backs), 12 of L2."""
    probe = Engine(model, EngineConfig(device="cpu", page_size=PS))
    bpp = probe.pool.bytes_per_page
    cfg = EngineConfig(
        device="cpu",
        page_size=PS,
        kv_mem=l1 * bpp,
        kv_host_mem=12 * bpp,
        kv_disk=str(tmp_path / name),
        max_running=4,
        unsafe=unsafe,
        integrity=IntegrityConfig(**ic),
    )
    e = Engine(model, cfg)
    if slow_reader:  # the reader arrives long after a copy would have landed
        guard = e.pool.read_guard

        def slow(layer, plane, rows):
            if e.kv.tiers.loads_in_flight():
                time.sleep(0.005)
            guard(layer, plane, rows)

        e.pool.read_guard = slow
    ids = [e.submit(prompt_ids=p, max_new_tokens=8, ignore_eos=True) for p in prompts]
    e.run_until_done()
    e.close()
    return e, [e.request(i) for i in ids]


@pytest.fixture(scope="module")
def clean(tiny_dsa, prompts, tmp_path_factory):
    _, reqs = _run(tiny_dsa, prompts, tmp_path_factory.mktemp("clean"), "clean")
    return {tuple(r.prompt_ids): r.output_ids for r in reqs}


def _corrupt(reqs, ref) -> int:
    """Tokens that differ from the clean run (requests the injection aborted excluded)."""
    return sum(
        a != b
        for r in reqs
        if r.finish_reason == "length"
        for a, b in zip(r.output_ids, ref[tuple(r.prompt_ids)], strict=True)
    )


def _row(e, kind):
    row = e.monitor.faults.ledger.report(kind)
    assert set(DETECTORS) <= set(row["detected_by"])
    return row


def test_skip_fence_reads_stale_bytes_every_time(tiny_dsa, prompts, clean, tmp_path):
    """Protections on: every skipped fence is seen at the read, nothing corrupt is emitted.
    --unsafe, with a reader slowed down (5 ms before each read while loads are in flight,
    long after an unheld copy would have landed): the stale read still happens every time."""
    e, reqs = _run(tiny_dsa, prompts, tmp_path, "sf", l1=10, faults={"skip-fence": 0.3})
    row = _row(e, "skip-fence")
    # changed < injected only where the LOADING page already held the same bytes (a page
    # reloaded into the slot it was evicted from): compared, so not counted
    assert row["injected"] >= 4 and row["changed_frac"] >= 0.6, row
    assert row["detected_by"]["fence"] == row["detected"] == row["injected"], row
    assert row["detection_delay_steps"]["max"] == 0
    assert row["extra"].get("hold_expired", 0) == 0
    assert _corrupt(reqs, clean) == 0  # protections on: recovered before any token
    e, reqs = _run(
        tiny_dsa,
        prompts,
        tmp_path,
        "sfu",
        unsafe=True,
        slow_reader=True,
        l1=10,
        faults={"skip-fence": 0.3},
    )
    row = _row(e, "skip-fence")
    assert row["injected"] >= 4 and row["changed_frac"] >= 0.6 and row["detected"] == 0, row
    assert _corrupt(reqs, clean) > 0  # the read-before-ready garbles the output


def test_abort_reuse_late_write_garbles_unsafe_and_is_caught_when_bypassed(
    tiny_dsa, prompts, clean, tmp_path
):
    e, reqs = _run(tiny_dsa, prompts, tmp_path, "safe", faults={"abort-reuse": 0.2})
    row = _row(e, "abort-reuse")
    assert row["injected"] >= 3 and row["prevented"] == row["injected"] and row["changed"] == 0
    assert _corrupt(reqs, clean) == 0
    e, reqs = _run(
        tiny_dsa, prompts, tmp_path, "bypass", faults={"abort-reuse": 0.2}, bypass_drain=True
    )
    row = _row(e, "abort-reuse")
    assert row["injected"] >= 3 and row["changed_frac"] >= 0.6, row
    assert row["detected_by"]["epoch"] >= row["changed"], row
    assert _corrupt(reqs, clean) == 0
    e, reqs = _run(tiny_dsa, prompts, tmp_path, "unsafe", unsafe=True, faults={"abort-reuse": 0.2})
    row = _row(e, "abort-reuse")
    assert row["injected"] >= 3 and row["changed_frac"] >= 0.6 and row["detected"] == 0, row
    assert _corrupt(reqs, clean) > 0  # the use-after-free garbling reproduces


def test_tier_faults_hit_copies_on_their_way_to_a_reader(tiny_dsa, prompts, clean, tmp_path):
    e, reqs = _run(tiny_dsa, prompts, tmp_path, "hb", l1=10, faults={"host-bitflip": 0.3})
    row = _row(e, "host-bitflip")
    assert row["injected"] >= 2 and row["changed"] == row["injected"], row
    assert row["detected_by"]["checksum"] == row["changed"], row  # the load's checksum
    assert _corrupt(reqs, clean) == 0
    e, reqs = _run(tiny_dsa, prompts, tmp_path, "dc", l1=10, faults={"disk-corrupt": 0.3})
    row = _row(e, "disk-corrupt")
    # the store rejects a damaged file before any tier holds its bytes: caught, never read
    assert row["injected"] >= 2 and row["changed"] == 0, row
    assert row["detected_by"]["checksum"] == row["injected"], row
    assert _corrupt(reqs, clean) == 0


def test_held_copy_step_waits_for_ready_without_blocking_others():
    """CopyHooks.ready holds one transfer's steps; the worker runs the others meanwhile."""
    import torch

    held = threading.Event()
    hooks = CopyHooks(ready=lambda t, layer: t.kind != "load" or held.is_set())
    eng = CopyEngine(2, hooks=hooks)
    src = {"p": torch.ones(2, 2, 3)}
    a, b = {"p": torch.zeros(2, 2, 3)}, {"p": torch.zeros(2, 2, 3)}
    t_load = eng.copy_pages(src, a, [0], [0], kind="load")
    t_other = eng.copy_pages(src, b, [0], [0], kind="backup")
    assert t_other.wait_all(5)  # not stuck behind the held load
    time.sleep(0.05)
    assert t_load.progress == 0 and not t_load.fences[0].done() and a["p"].sum() == 0
    held.set()
    eng.kick()
    assert t_load.wait_all(5) and a["p"][:, 0].sum() == 6
    assert eng.close(5)


def test_ledger_credits_any_detector_and_measures_the_delay():
    """A flag credits the recent injections that touched its pages or requests, once per
    detector; a detector the ledger has never heard of gets its own column."""
    from runtime.integrity.ledger import Ledger

    led = Ledger()
    a = led.effect("skip-fence", 10, slots=[3], rids=["r1"])
    led.effect("skip-fence", 11, slots=[4], rids=["r2"])
    led.flagged("acceptance", 14, rids=["r1"])
    led.flagged("fence", 15, slots=[3])
    led.flagged("fence", 16, slots=[3])  # the same injection, the same detector: once
    row = led.report("skip-fence")
    assert row["detected"] == 1 and a.detected == {"acceptance": 14, "fence": 15}
    assert row["detected_by"]["acceptance"] == 1 and row["detected_by"]["fence"] == 1
    assert list(row["detected_by"])[: len(DETECTORS)] == list(DETECTORS)
    assert row["detection_delay_steps"] == {"mean": 4.0, "max": 4}
