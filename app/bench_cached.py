"""Time to first token with the prompt's prefix already cached in L1, L2 or L3 (HiCache).

Each cycle takes a fresh prompt, runs it once (cold; with `write_through` its full pages are
backed up to L2 and L3), waits for the copies, then times the same prompt three times: with the
pages still in L1; after evicting L1 (served from L2); after evicting L1 and L2 (served from L3,
read back through L2). Every timed run checks, through the request's `cached_tokens`, that the
tier it claims to measure really served the prefix; a run that was not served from that tier is
reported as a failure rather than as a number.

The engine for these rows has L2 and L3 on: the user's --kv-host-mem / --kv-disk when given,
else 256 MiB of host memory and a temporary directory (removed afterwards).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace

from app.bench_runners import KvscopeRunner, RunResult
from runtime.errors import KvscopeError

TIERS = ("L1", "L2", "L3")
DEFAULT_HOST_MEM = 256 << 20


def tier_config(econf):
    """The engine config for the cached rows, and a temp dir to remove (or None)."""
    tmp = None if econf.kv_disk else tempfile.mkdtemp(prefix="kvscope-bench-l3-")
    conf = replace(
        econf,
        kv_host_mem=econf.kv_host_mem or DEFAULT_HOST_MEM,
        kv_disk=econf.kv_disk or tmp,
        write_policy="write_through",
    )
    return conf, tmp


def has_tiers(econf) -> bool:
    return bool(econf.kv_host_mem and econf.kv_disk and econf.write_policy == "write_through")


def evict_tiers(runner: KvscopeRunner, tiers: tuple[str, ...]) -> None:
    """Drain the backups in flight, then evict every page of the named tiers (L1, L2)."""
    eng = runner.engine
    with eng._lock:
        ctl = eng.kv.tiers
        ctl.drain()  # backups of the cold run have landed (L2, then L3)
        if "L1" in tiers:
            ctl.evict_l1(eng.pool.num_slots)
        if "L2" in tiers and eng.kv.host is not None:
            ctl.evict_l2(eng.kv.host.num_slots)
        ctl.drain()


def measure_cached_ttft(
    runner: KvscopeRunner, prompt_of, cycles: int, warmup: int = 1
) -> tuple[dict[str, list[RunResult]], list[dict]]:
    """prompt_of(i) -> a fresh prompt; returns {tier: runs} and per-run cached-token records."""
    runs: dict[str, list[RunResult]] = {t: [] for t in TIERS}
    record = []
    for i in range(warmup + cycles):
        prompt = prompt_of(i)
        runner.run([prompt], 2)  # cold: computes and caches the prefix
        for tier, evict in (("L1", ()), ("L2", ("L1",)), ("L3", ("L1", "L2"))):
            evict_tiers(runner, evict)
            res = runner.run([prompt], 2)  # 2: the request outlives its first step
            served = res.extra["cached_tokens"]
            if not served.get(tier):
                raise KvscopeError(
                    f"bench: the prefix was not served from {tier} (cached tokens {served}); "
                    "the cached-TTFT row would be wrong"
                )
            if i >= warmup:
                runs[tier].append(res)
                record.append({"tier": tier, "cycle": i - warmup, "cached_tokens": served})
    return runs, record


def cleanup(tmp: str | None) -> None:
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
