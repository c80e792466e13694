"""Builds the immutable EngineSnapshot from an `EngineView`: the engine's state, read only
(caller holds the engine lock)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.telemetry import (
    TIERS,
    EngineSnapshot,
    PageInfo,
    RadixSummary,
    RequestInfo,
    TierUsage,
)


@dataclass
class EngineStats:
    """Counters the engine updates after each step (read by snapshots and benches)."""

    started: float  # time.monotonic() at engine start
    tokens_generated: int = 0
    decode_tok_per_s: float = 0.0  # last decode-only step
    prefill_tok_per_s: float = 0.0  # last step with a prefill chunk


@dataclass(frozen=True)
class EngineView:
    """What a snapshot reads. The fields are the engine's live objects; nothing here writes."""

    model_dir: Path
    arch: str
    device: str
    page_size: int
    kv: object  # the cache stack: alloc, tree, tiers (runtime/cache_stack.py)
    tokenizer: object | None
    requests: Mapping  # request id -> Request, read-only
    stats: EngineStats
    events: Sequence  # the integrity monitor's event log
    weight_plan: object | None = None


def _requests(engine) -> tuple[RequestInfo, ...]:
    out = []
    for req in engine.requests.values():
        out.append(
            RequestInfo(
                request_id=req.request_id,
                status=req.status,
                prompt_tokens=len(req.prompt_ids),
                generated_tokens=len(req.output_ids),
                cached_tokens=dict(req.cached_tokens),
                pages=len(req.pages),
                ttft_s=req.ttft_s(),
                tok_per_s=req.tok_per_s(),
                verdict=req.verdict,
                accept_length=req.spec.accept_length if req.spec else None,
                accept_rate=req.spec.accept_rate if req.spec else None,
            )
        )
    return tuple(out)


def _pages(engine) -> tuple[PageInfo, ...]:
    pages = []
    for rec in engine.kv.alloc.records:
        sums = rec.checksums
        digest = None
        if sums:
            first = sorted(sums)[0]
            digest = f"{sums[first] & 0xFFFFFFFFFFFFFFFF:016x}"
        tiers = set(rec.tiers)
        if rec.state.value != "FREE":
            tiers.add("L1")
        pages.append(
            PageInfo(
                slot=rec.slot,
                state=rec.state.value,
                owners=tuple(sorted(rec.owners)),
                epoch=rec.epoch,
                tokens=rec.tokens,
                checksum=digest,
                tiers=tuple(t for t in TIERS if t in tiers),
            )
        )
    return tuple(pages)


def _radix(engine) -> RadixSummary:
    tree, ps = engine.kv.tree, engine.page_size
    leaves = [n for n in tree.nodes() if not n.children]
    deepest = sorted(leaves, key=lambda n: n.depth, reverse=True)[:5]
    longest = []
    for node in deepest:
        ids = [t for n in node.path() for t in n.key]
        tok = engine.tokenizer
        preview = tok.decode(ids[:24]) if tok is not None else " ".join(map(str, ids[:12]))
        longest.append((node.depth * ps, preview.replace("\n", " ")))
    return RadixSummary(
        nodes=tree.num_nodes,
        cached_tokens=tree.num_nodes * ps,
        longest_prefixes=tuple(longest),
        hits_by_tier={t: int(tree.hits.get(t, 0)) for t in TIERS},
    )


def build_snapshot(engine: EngineView) -> EngineSnapshot:
    stats = engine.kv.tiers.stats()
    tiers = tuple(
        TierUsage(
            t, stats.pages_used[t], stats.pages_total[t], stats.bytes_used[t], stats.bytes_total[t]
        )
        for t in TIERS
    )
    return EngineSnapshot(
        time_s=time.monotonic() - engine.stats.started,
        model=str(engine.model_dir),
        arch=engine.arch,
        device=engine.device,
        page_size=engine.page_size,
        tiers=tiers,
        pages=_pages(engine),
        requests=_requests(engine),
        radix=_radix(engine),
        transfers_in_flight=stats.transfers_in_flight,
        evictions=stats.evictions,
        drained_pages=stats.drained_pages,
        decode_tok_per_s=engine.stats.decode_tok_per_s,
        prefill_tok_per_s=engine.stats.prefill_tok_per_s,
        tokens_generated=engine.stats.tokens_generated,
        integrity_events=tuple(engine.events)[-200:],
        expert_heat=_expert_heat(engine),
    )


def _expert_heat(engine) -> tuple[tuple[int, ...], ...]:
    plan = engine.weight_plan
    heat = plan.expert_heat() if plan is not None else ()
    return tuple(tuple(int(x) for x in row) for row in heat)
