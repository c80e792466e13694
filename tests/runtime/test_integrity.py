"""Integrity: each injected fault is a real fault; protections prevent or detect it and the
outputs equal a clean run; --unsafe shows the garbling; clean runs raise no false alarm."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.engine import Engine, EngineConfig
from runtime.errors import KvscopeError
from runtime.integrity.anomaly import runaway_repetition, unexpected_chars
from runtime.integrity.config import IntegrityConfig, parse_inject

PS = 8


@pytest.fixture(scope="module")
def workload():
    rng = random.Random(0)
    prefixes = [[rng.randrange(2, 200) for _ in range(24)] for _ in range(6)]
    return [rng.choice(prefixes) + [rng.randrange(2, 200) for _ in range(3)] for _ in range(40)]


def _run(d, prompts, tmp_path, name, unsafe=False, **ic):
    probe = Engine(d, EngineConfig(device="cpu", page_size=PS))
    bpp = probe.pool.bytes_per_page
    cfg = EngineConfig(
        device="cpu",
        page_size=PS,
        kv_mem=14 * bpp,
        kv_host_mem=12 * bpp,
        kv_disk=str(tmp_path / name),
        max_running=4,
        unsafe=unsafe,
        integrity=IntegrityConfig(**ic),
    )
    e = Engine(d, cfg)
    ids = [e.submit(prompt_ids=p, max_new_tokens=8, ignore_eos=True) for p in prompts]
    e.run_until_done()
    e.close()
    return e, [e.request(i) for i in ids]


def _wrong(reqs, ref) -> int:
    return sum(
        r.output_ids != ref[tuple(r.prompt_ids)] for r in reqs if r.finish_reason == "length"
    )


@pytest.fixture(scope="module")
def clean(tiny_dsa, workload, tmp_path_factory):
    e, reqs = _run(tiny_dsa, workload, tmp_path_factory.mktemp("clean"), "clean")
    assert all(not r.violations for r in reqs), "false positive in a clean run"
    assert all(r.checked_tokens == len(r.output_ids) for r in reqs)
    return {tuple(r.prompt_ids): r.output_ids for r in reqs}


def test_abort_reuse_is_prevented_by_safe_reclaim(tiny_dsa, workload, clean, tmp_path):
    e, reqs = _run(tiny_dsa, workload, tmp_path, "a", faults={"abort-reuse": 0.3})
    c = e.monitor.faults.counts["abort-reuse"]
    assert c["injected"] > 5 and c["prevented"] == c["injected"] and c["changed"] == 0
    assert _wrong(reqs, clean) == 0


def test_abort_reuse_with_drain_bypassed_is_detected_and_recovered(
    tiny_dsa, workload, clean, tmp_path
):
    e, reqs = _run(
        tiny_dsa, workload, tmp_path, "b", faults={"abort-reuse": 0.3}, bypass_drain=True
    )
    c = e.monitor.faults.counts["abort-reuse"]
    assert c["changed"] > 3 and c["detected"] >= c["changed"]  # every byte-changing one seen
    assert _wrong(reqs, clean) == 0  # recovered before any token was emitted
    assert any(r.violations for r in reqs)
    kinds = {ev.kind for ev in e.monitor.events}
    assert {"epoch", "recovery"} <= kinds


def test_abort_reuse_unsafe_reproduces_the_garbling(tiny_dsa, workload, clean, tmp_path):
    e, reqs = _run(tiny_dsa, workload, tmp_path, "c", unsafe=True, faults={"abort-reuse": 0.3})
    assert e.monitor.faults.counts["abort-reuse"]["changed"] > 3
    assert _wrong(reqs, clean) > 0


def test_skip_fence_is_detected_and_unsafe_reads_stale_kv(tiny_dsa, workload, clean, tmp_path):
    e, reqs = _run(tiny_dsa, workload, tmp_path, "d", faults={"skip-fence": 0.5})
    c = e.monitor.faults.counts["skip-fence"]
    assert c["injected"] > 0 and c["detected"] >= c["changed"] > 0
    assert _wrong(reqs, clean) == 0
    e, reqs = _run(tiny_dsa, workload, tmp_path, "e", unsafe=True, faults={"skip-fence": 0.5})
    assert e.monitor.faults.counts["skip-fence"]["changed"] > 0
    assert _wrong(reqs, clean) > 0


@pytest.mark.parametrize("kind", ["host-bitflip", "disk-corrupt"])
def test_tier_corruption_is_never_served(tiny_dsa, workload, clean, tmp_path, kind):
    # every load-back flipped: how many there are depends on the copy threads' timing (3 to
    # 7 at rate 0.5 in repeated runs, 11 to 15 at 1.0)
    rate = {"host-bitflip": 1.0, "disk-corrupt": 0.5}[kind]
    e, reqs = _run(tiny_dsa, workload, tmp_path, kind, faults={kind: rate})
    assert e.monitor.faults.counts[kind]["injected"] > 3
    assert _wrong(reqs, clean) == 0
    if kind == "host-bitflip":
        assert e.kv.tiers.load_failures > 0  # a flipped copy was read back and rejected
    else:
        assert e.kv.disk.stats["rejected"] >= 0


def test_l1_corruption_is_caught_by_the_shadow_check(tiny_dsa):
    e = Engine(
        tiny_dsa,
        EngineConfig(device="cpu", page_size=PS, integrity=IntegrityConfig(shadow_rate=1.0)),
    )
    prompt = list(range(3, 40))
    ref = e.generate(prompt, max_new_tokens=6, ignore_eos=True)
    rid = e.submit(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True)
    e.step()  # prefill; the prompt's pages are now in L1
    pages = e.request(rid).pages or e.sched.get(rid).pages
    e.pool.planes["latent"][:, pages[1]] += 3.0  # corrupt one page's bytes behind its owner
    e.run_until_done()
    r = e.request(rid)
    assert r.output_ids == ref  # the bad token was never emitted; the page was recomputed
    assert any("shadow" in v or "checksum" in v for v in r.violations)


def test_anomaly_signals():
    assert runaway_repetition([5] * 12) and runaway_repetition([1, 2] * 12)
    assert not runaway_repetition(list(range(40)))
    assert unexpected_chars("hello", "wörld ok") == []
    assert unexpected_chars("hello", "ab\u0416\ufffd") == ["\u0416", "\ufffd"]
    assert unexpected_chars("привет", "\u0416") == []


def test_inject_grammar():
    assert parse_inject(["abort-reuse", "skip-fence:0.25"]) == {
        "abort-reuse": 0.05,
        "skip-fence": 0.25,
    }
    for bad in (["nope"], ["host-bitflip:2"], ["disk-corrupt:x"]):
        with pytest.raises(KvscopeError):
            parse_inject(bad)


def test_per_token_verdicts_stream(tiny_dsa):
    e = Engine(tiny_dsa, EngineConfig(device="cpu", page_size=PS))
    rid = e.submit(prompt_ids=list(range(3, 30)), max_new_tokens=5, ignore_eos=True)
    evs = [ev for ev in e.stream(rid)]
    assert all(ev.verdict.verdict == "ok" and ev.verdict.epochs_ok for ev in evs[:-1])
    assert all(ev.verdict.pages for ev in evs[:-1])
    assert torch.is_tensor(e.pool.planes["latent"])


def test_shadow_budget_caps_recompute_time(tiny_dsa):
    """Sampled shadows stop once they took more than shadow_budget of the step time; rate 1.0
    (every token) is never capped; no budget keeps every sampled shadow."""

    def shadows(**kw):
        ic = IntegrityConfig(seed=3, **kw)
        e = Engine(tiny_dsa, EngineConfig(device="cpu", page_size=PS, integrity=ic))
        e.generate(list(range(3, 60)), max_new_tokens=40, ignore_eos=True)
        return e.monitor

    capped = shadows(shadow_rate=0.5, shadow_budget=0.01)
    free = shadows(shadow_rate=0.5, shadow_budget=None)
    assert free.shadow_runs >= 10 and free.shadow_skipped == 0
    assert capped.shadow_skipped > 0 and capped.shadow_runs < free.shadow_runs
    assert capped.shadow_runs + capped.shadow_skipped == free.shadow_runs  # same draws
    every = shadows(shadow_rate=1.0, shadow_budget=0.01)
    assert every.shadow_skipped == 0 and every.shadow_runs == 40
