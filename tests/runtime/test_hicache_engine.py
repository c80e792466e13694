"""HiCache through the real engine: prefix reuse from L1, L2 and L3 (across a restart),
damaged L3 files recomputed, and a churn stress run with aborts and timeouts."""

from __future__ import annotations

import random

import pytest

from runtime.engine import Engine, EngineConfig

PS = 8
PREFIX = [5 + (i * 13) % 190 for i in range(40)]  # 5 full pages shared by every prompt


def _engine(d, **kw) -> Engine:
    kw.setdefault("page_size", PS)
    return Engine(d, EngineConfig(device="cpu", dtype="float32", **kw))


def _run(e: Engine, prompt, n=8) -> tuple[list[int], dict]:
    rid = e.submit(prompt_ids=prompt, max_new_tokens=n, ignore_eos=True)
    e.run_until_done()
    r = e.request(rid)
    return r.output_ids, dict(r.cached_tokens)


def test_shared_prefix_is_served_from_l1(tiny_dsa):
    ref = _engine(tiny_dsa)
    alone = _run(ref, PREFIX + [7, 8, 9])[0]
    e = _engine(tiny_dsa)
    _run(e, PREFIX + [11, 12])
    out, cached = _run(e, PREFIX + [7, 8, 9])
    assert out == alone and cached["L1"] == 40


def test_prefix_evicted_to_l2_is_loaded_back(tiny_glm4):
    ref = _engine(tiny_glm4)
    alone = _run(ref, PREFIX + [3, 4])[0]
    probe = _engine(tiny_glm4)
    bpp = probe.pool.bytes_per_page
    # L1 holds 8 pages: after an unrelated request the shared prefix only survives in L2.
    e = _engine(tiny_glm4, kv_mem=8 * bpp, kv_host_mem=64 * bpp)
    _run(e, PREFIX + [1])
    _run(e, [100 + i for i in range(50)])
    out, cached = _run(e, PREFIX + [3, 4])
    assert out == alone
    assert cached["L2"] > 0 and cached["L1"] + cached["L2"] == 40
    e.kv.sched.check_invariants()


def test_l3_survives_a_restart_and_damaged_files_are_recomputed(tmp_path, tiny_dsa):
    disk = tmp_path / "kv"
    ref = _engine(tiny_dsa)
    alone = _run(ref, PREFIX + [9, 9])[0]
    kw = dict(kv_host_mem=1 << 20, kv_disk=str(disk))
    first = _engine(tiny_dsa, **kw)
    _run(first, PREFIX + [2])
    first.close()  # backups finish: the prefix is on disk
    files = sorted(disk.rglob("*.kvp")) or sorted(p for p in disk.rglob("*") if p.is_file())
    assert len(files) >= 5
    second = _engine(tiny_dsa, **kw)  # a new process would see exactly this directory
    out, cached = _run(second, PREFIX + [9, 9])
    assert out == alone and cached["L3"] == 40
    second.close()
    # Damage: truncate one page file and flip a bit in another; both are misses, recomputed.
    pages = sorted(p for p in disk.rglob("*") if p.is_file() and p.stat().st_size > 64)
    pages[0].write_bytes(pages[0].read_bytes()[: pages[0].stat().st_size // 2])
    raw = bytearray(pages[1].read_bytes())
    raw[-10] ^= 0x10
    pages[1].write_bytes(bytes(raw))
    third = _engine(tiny_dsa, **kw)
    out, cached = _run(third, PREFIX + [9, 9])
    assert out == alone and cached["L3"] < 40
    third.close()


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_churn_stress_with_aborts_and_timeouts(tmp_path, tiny_dsa, policy):
    rng = random.Random(1234)
    # 8 prefixes of 3-4 pages: their 28 pages cannot all stay in a 16-page L1 or a 16-page L2.
    prefixes = [[rng.randrange(2, 200) for _ in range(rng.choice((24, 32)))] for _ in range(8)]
    prompts = [rng.choice(prefixes) + [rng.randrange(2, 200) for _ in range(rng.randint(1, 9))]]
    while len(prompts) < 64:
        prompts.append(
            rng.choice(prefixes) + [rng.randrange(2, 200) for _ in range(rng.randint(1, 9))]
        )
    ref = _engine(tiny_dsa)
    expected = {}
    for p in {tuple(p) for p in prompts}:
        expected[p] = _run(ref, list(p), n=6)[0]
    probe = _engine(tiny_dsa)
    bpp = probe.pool.bytes_per_page
    e = _engine(
        tiny_dsa,
        kv_mem=16 * bpp,  # far smaller than the working set (64 requests x 4-6 pages)
        kv_host_mem=16 * bpp,
        kv_disk=str(tmp_path / "l3"),
        write_policy=policy,
        max_running=4,
    )
    ids = {}
    for i, p in enumerate(prompts):
        timeout = 0.0 if i % 17 == 5 else None
        ids[e.submit(prompt_ids=p, max_new_tokens=6, ignore_eos=True, timeout_s=timeout)] = p
    steps = 0
    while e.has_work():
        e.step()
        steps += 1
        if steps % 7 == 0:
            running = [r for r in ids if not e.request(r).done]
            if running:
                e.abort(rng.choice(running))
        if steps % 10 == 0:
            e.kv.sched.check_invariants()
    finished = [r for r in ids if e.request(r).finish_reason == "length"]
    assert len(finished) > 30
    for r in finished:
        assert e.request(r).output_ids == expected[tuple(ids[r])], r
    e.close()
    counts = e.kv.alloc.counts()
    assert counts["WRITING"] == counts["READY"] == counts["DRAINING"] == counts["LOADING"] == 0
    assert all(not rec.owners for rec in e.kv.alloc.records)  # no page leaked, refcounts zero
    e.kv.sched.check_invariants()
    hits = e.kv.tree.hits
    assert hits.get("L1", 0) > 0 and hits.get("L2", 0) + hits.get("L3", 0) > 0, hits
