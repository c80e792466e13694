"""The soak (app/soak.py) at a small scale: shared prefixes through small L1/L2 and an L3, random
aborts and timeouts; at the end every page is FREE or CACHED, no reference is left, and the
process has no more threads or file descriptors than after the warm-up. The full run
(`kvscope chaos --soak 20000` on the demo model) and its figures: docs/integrity.md."""

from __future__ import annotations

import pytest

from app.soak import audit, run_soak


@pytest.mark.slow
def test_soak_small(tiny_dsa):
    rep = run_soak(
        str(tiny_dsa),
        160,
        max_running=4,
        abort_rate=0.05,
        timeout_rate=0.1,
        warmup=40,
        sample_every=40,
    )
    assert rep["requests"] == 160
    assert rep["aborted"] > 0 and rep["timed_out"] > 0 and rep["completed"] > 0
    pages = rep["pages"]
    assert pages["free_or_cached"] == pages["l1_pages"] and pages["references"] == 0
    assert pages["L3_pages"] > 0  # the prefixes went through the disk tier
    assert rep["fd_growth"] <= 0 and rep["thread_growth"] <= 0, rep["curve"]
    assert rep["ok"], rep


def test_audit_finds_a_leaked_page(tiny_dsa):
    from runtime.engine import Engine, EngineConfig

    engine = Engine(tiny_dsa, EngineConfig(device="cpu", page_size=4))
    engine.kv.alloc.alloc("ghost", 1)  # a page nobody will ever release
    with pytest.raises(AssertionError):
        audit(engine)
    engine.close()
