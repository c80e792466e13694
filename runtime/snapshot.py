"""Builds the immutable EngineSnapshot from live engine state (caller holds the engine lock)."""

from __future__ import annotations

import time

from runtime.telemetry import EngineSnapshot, PageInfo, RadixSummary, RequestInfo, TierUsage


def build_snapshot(engine) -> EngineSnapshot:
    pool, ps = engine.pool, engine.config.page_size
    owner_of: dict[int, tuple[str, int]] = {}
    requests = []
    for req in engine._requests.values():
        for i, slot in enumerate(req.pages):
            filled = min(ps, max(0, req.computed - i * ps))
            owner_of[slot] = (req.request_id, filled)
        requests.append(
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
            )
        )
    pages = []
    for slot in range(pool.num_slots):
        owner = owner_of.get(slot)
        pages.append(
            PageInfo(
                slot=slot,
                state="READY" if owner else "FREE",
                owners=(owner[0],) if owner else (),
                epoch=0,
                tokens=owner[1] if owner else 0,
                checksum=None,
                tiers=("L1",) if owner else (),
            )
        )
    used = len(owner_of)
    bpp = pool.bytes_per_page
    tiers = (
        TierUsage("L1", used, pool.num_slots, used * bpp, pool.total_bytes),
        TierUsage("L2", 0, 0, 0, 0),
        TierUsage("L3", 0, 0, 0, 0),
    )
    return EngineSnapshot(
        time_s=time.monotonic() - engine._started,
        model=str(engine.model_dir),
        arch=engine.model_config.arch,
        device=str(engine.device),
        page_size=ps,
        tiers=tiers,
        pages=tuple(pages),
        requests=tuple(requests),
        radix=RadixSummary(0, 0, (), {"L1": 0, "L2": 0, "L3": 0}),
        decode_tok_per_s=engine._decode_rate,
        prefill_tok_per_s=engine._prefill_rate,
        tokens_generated=engine._tokens_generated,
        expert_heat=_expert_heat(engine),
    )


def _expert_heat(engine) -> tuple[tuple[int, ...], ...]:
    plan = getattr(engine, "weight_plan", None)
    heat = plan.expert_heat() if plan is not None else ()
    return tuple(tuple(int(x) for x in row) for row in heat)
