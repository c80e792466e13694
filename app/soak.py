"""`kvscope chaos --soak N`: N tiny requests through small L1/L2 tiers and an L3, with shared
prefixes, random aborts and timeouts, then an audit of everything that could leak.

Workload: prompts are one of a few shared prefixes (several pages each, so they are cached,
evicted to L2/L3 and loaded back) plus a random tail; each request asks for 1-3 new tokens.
Up to ``max_running`` requests run at once (twice that many are queued); every step a random
running request is aborted with probability ``abort_rate``, and a ``timeout_rate`` share of the
requests have a timeout so short that it expires while they wait or run.

Audit at the end (after the engine drained its transfers): every L1 page FREE or CACHED, every
L2 slot FREE or READY, no page with an owner, the tier / tree / scheduler invariants (refcount
== owners == radix lock_ref), and, against the state after the warm-up, the process's open file
descriptors, threads and resident memory (sampled every ``sample_every`` requests: the curve).

The engine keeps every finished Request for ``Engine.request(rid)``; a long-lived caller must
drop them, which the soak does after reading each one (``Engine.forget``).
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from runtime.engine import Engine, EngineConfig
from runtime.kv.allocator import PageState

RSS_BOUND_MB = 64.0  # allowed resident-memory growth after the warm-up


def _rss_mb(field: str = "RssAnon") -> float:
    """Resident memory in MB: RssAnon (the default) is the process's anonymous memory (heap,
    tensors); VmRSS also counts file-backed pages (the memory-mapped checkpoint, libraries)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _config(probe: Engine, page_size: int, max_running: int, kv_dir: str) -> EngineConfig:
    bpp = probe.pool.bytes_per_page
    return EngineConfig(
        device=probe.config.device,
        page_size=page_size,
        kv_mem=max(4 * max_running, 24) * bpp,  # fewer pages than the prefixes need
        kv_host_mem=16 * bpp,
        kv_disk=kv_dir,
        kv_disk_size=64 << 20,
        max_running=max_running,
        cpu_graph=probe.config.cpu_graph,
    )


def audit(engine: Engine) -> dict:
    """Final page states and the invariants; raises AssertionError on a leak."""
    kv = engine.kv
    kv.tiers.drain()
    kv.sched.check_invariants()  # tiers, tree, allocator: refcount == owners == lock_ref
    counts = kv.alloc.counts()
    leaked = {s: n for s, n in counts.items() if n and s not in ("FREE", "CACHED")}
    owners = sum(r.refcount for r in kv.alloc.records)
    l2 = {}
    if kv.host is not None:
        for rec in kv.host.slots:
            l2[rec.state] = l2.get(rec.state, 0) + 1
    assert not leaked, f"pages left in {leaked}"
    assert owners == 0, f"{owners} page references left"
    assert all(s in ("FREE", "READY") for s in l2), l2
    assert not engine.has_work()
    return {
        "L1": {s: n for s, n in counts.items() if n},
        "L2": l2,
        "L3_pages": kv.disk.num_pages if kv.disk is not None else 0,
        "references": owners,
        "free_or_cached": counts[PageState.FREE.value] + counts[PageState.CACHED.value],
        "l1_pages": len(kv.alloc.records),
    }


def run_soak(
    model: str,
    requests: int = 20000,
    *,
    device: str = "cpu",
    page_size: int = 4,
    max_running: int = 8,
    abort_rate: float = 0.02,
    timeout_rate: float = 0.05,
    warmup: int = 1000,
    sample_every: int = 1000,
    seed: int = 0,
    cpu_graph: str = "off",
    log=None,
) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="kvscope-soak-") as tmp:
        probe = Engine(model, EngineConfig(device=device, page_size=page_size, cpu_graph="off"))
        probe.close()
        cfg = replace(
            _config(probe, page_size, max_running, str(Path(tmp) / "l3")), cpu_graph=cpu_graph
        )
        vocab = probe.model_config.vocab_size
        del probe
        engine = Engine(model, cfg)
        prefixes = [
            [rng.randrange(2, vocab) for _ in range(page_size * (2 + k % 4))] for k in range(12)
        ]
        submitted = finished = aborted = timed_out = 0
        base = None
        curve: list[dict] = []
        running: set[str] = set()
        t0 = time.perf_counter()
        while finished < requests:
            while submitted < requests and len(running) < 2 * max_running:
                prompt = rng.choice(prefixes) + [
                    rng.randrange(2, vocab) for _ in range(rng.randint(1, page_size + 1))
                ]
                short = rng.random() < timeout_rate
                rid = engine.submit(
                    prompt_ids=prompt,
                    max_new_tokens=rng.randint(1, 3),
                    ignore_eos=True,
                    request_id=f"s{submitted}",
                    timeout_s=rng.uniform(0.0, 0.01) if short else None,
                )
                running.add(rid)
                submitted += 1
            events = engine.step()
            if running and rng.random() < abort_rate * len(running):
                rid = rng.choice(sorted(running))
                events += engine.abort(rid)
            for ev in events:
                if ev.finished and ev.request_id in running:
                    running.discard(ev.request_id)
                    finished += 1
                    reason = ev.finish_reason
                    aborted += reason == "abort"
                    timed_out += reason == "timeout"
                    engine.forget(ev.request_id)  # the caller is done with it
                    if finished == warmup or (finished % sample_every == 0):
                        point = {
                            "requests": finished,
                            "rss_mb": round(_rss_mb(), 1),
                            "vmrss_mb": round(_rss_mb("VmRSS"), 1),
                            "fds": _fds(),
                            "threads": _threads(),
                            "py_threads": threading.active_count(),
                            "seconds": round(time.perf_counter() - t0, 1),
                        }
                        curve.append(point)
                        if finished == warmup:
                            base = point
                        if log is not None:
                            log(point)
        pages = audit(engine)
        end = {"rss_mb": _rss_mb(), "fds": _fds(), "threads": _threads()}
        engine.close()
    base = base or curve[0]
    report = {
        "model": model,
        "requests": finished,
        "aborted": aborted,
        "timed_out": timed_out,
        "completed": finished - aborted - timed_out,
        "seconds": round(time.perf_counter() - t0, 1),
        "pages": pages,
        "warmup_requests": base["requests"],
        "rss_growth_mb": round(end["rss_mb"] - base["rss_mb"], 1),
        # the highest point after the warm-up: a release late in the run cannot hide growth
        "rss_peak_growth_mb": round(
            max(
                [end["rss_mb"]]
                + [pt["rss_mb"] for pt in curve if pt["requests"] >= base["requests"]]
            )
            - base["rss_mb"],
            1,
        ),
        "rss_bound_mb": RSS_BOUND_MB,
        "fd_growth": end["fds"] - base["fds"],
        "thread_growth": end["threads"] - base["threads"],
        "curve": curve,
    }
    report["ok"] = (
        report["rss_peak_growth_mb"] <= RSS_BOUND_MB
        and report["fd_growth"] <= 0
        and report["thread_growth"] <= 0
    )
    return report


def print_soak(rep: dict) -> None:
    print(
        f"soak: {rep['requests']} requests ({rep['completed']} completed, {rep['aborted']} "
        f"aborted, {rep['timed_out']} timed out) in {rep['seconds']} s"
    )
    p = rep["pages"]
    print(
        f"  L1 pages: {p['L1']} (all {p['l1_pages']} FREE or CACHED: "
        f"{p['free_or_cached'] == p['l1_pages']}); L2 slots: {p['L2']}; L3 pages: "
        f"{p['L3_pages']}; page references left: {p['references']}"
    )
    print(
        f"  after the warm-up ({rep['warmup_requests']} requests): RssAnon "
        f"{rep['rss_growth_mb']:+.1f} MB at the end, {rep['rss_peak_growth_mb']:+.1f} MB at its "
        f"highest (bound {rep['rss_bound_mb']} MB), fds "
        f"{rep['fd_growth']:+d}, threads {rep['thread_growth']:+d}: "
        f"{'OK' if rep['ok'] else 'LEAK'}"
    )
    print("  requests  RssAnon MB  VmRSS MB   fds  threads  seconds")
    for pt in rep["curve"]:
        print(
            f"  {pt['requests']:8d} {pt['rss_mb']:11.1f} {pt['vmrss_mb']:9.1f} {pt['fds']:5d} "
            f"{pt['threads']:8d} {pt['seconds']:8.1f}"
        )
