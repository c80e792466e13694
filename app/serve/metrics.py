"""Prometheus text exposition built from the runner's latest EngineSnapshot and its counters."""

from __future__ import annotations

from collections import Counter

from runtime.telemetry import TIERS, VERDICTS, EngineSnapshot


def _line(out: list[str], name: str, help_: str, kind: str, samples) -> None:
    out.append(f"# HELP kvscope_{name} {help_}")
    out.append(f"# TYPE kvscope_{name} {kind}")
    for labels, value in samples:
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out.append(f"kvscope_{name}{{{lab}}} {value}" if lab else f"kvscope_{name} {value}")


def prometheus_text(snap: EngineSnapshot, runner, engine=None) -> str:
    out: list[str] = []
    _line(
        out,
        "tier_pages_used",
        "KV pages held per tier",
        "gauge",
        [({"tier": t.tier}, t.pages_used) for t in snap.tiers],
    )
    _line(
        out,
        "tier_pages_total",
        "KV page capacity per tier",
        "gauge",
        [({"tier": t.tier}, t.pages_total) for t in snap.tiers],
    )
    _line(
        out,
        "tier_bytes_used",
        "KV bytes held per tier",
        "gauge",
        [({"tier": t.tier}, t.bytes_used) for t in snap.tiers],
    )
    _line(
        out,
        "tier_occupancy_ratio",
        "pages used / pages total per tier",
        "gauge",
        [
            ({"tier": t.tier}, round(t.pages_used / t.pages_total, 6) if t.pages_total else 0)
            for t in snap.tiers
        ],
    )
    hits = snap.radix.hits_by_tier
    total_hits = sum(hits.values())
    _line(
        out,
        "prefix_hits_total",
        "prefix pages reused, by the tier that served them",
        "counter",
        [({"tier": t}, hits.get(t, 0)) for t in TIERS],
    )
    _line(
        out,
        "prefix_hit_ratio",
        "share of prefix hits served by each tier",
        "gauge",
        [({"tier": t}, round(hits.get(t, 0) / total_hits, 6) if total_hits else 0) for t in TIERS],
    )
    states = Counter(p.state for p in snap.pages)
    _line(
        out,
        "l1_pages",
        "L1 page slots by state",
        "gauge",
        [({"state": s}, n) for s, n in sorted(states.items())],
    )
    _line(
        out,
        "decode_tokens_per_second",
        "decode rate of the last decode step",
        "gauge",
        [({}, round(snap.decode_tok_per_s, 3))],
    )
    _line(
        out,
        "prefill_tokens_per_second",
        "rate of the last prefill step",
        "gauge",
        [({}, round(snap.prefill_tok_per_s, 3))],
    )
    _line(
        out,
        "generated_tokens_total",
        "tokens generated since start",
        "counter",
        [({}, snap.tokens_generated)],
    )
    status = Counter(r.status for r in snap.requests)
    running = status["prefill"] + status["decode"]
    _line(out, "requests_running", "requests in prefill or decode", "gauge", [({}, running)])
    _line(
        out, "requests_waiting", "requests queued in the engine", "gauge", [({}, status["waiting"])]
    )
    _line(
        out,
        "requests_in_flight",
        "requests admitted by the server, not finished",
        "gauge",
        [({}, runner.in_flight)],
    )
    _line(
        out,
        "requests_rejected_total",
        "requests refused with 429",
        "counter",
        [({}, runner.rejected)],
    )
    _line(
        out,
        "requests_finished_total",
        "finished requests by finish reason",
        "counter",
        [({"reason": r}, n) for r, n in sorted(runner.finish_reasons.items())],
    )
    _line(
        out,
        "requests_by_verdict_total",
        "finished requests by integrity verdict",
        "counter",
        [({"verdict": v}, runner.verdicts.get(v, 0)) for v in VERDICTS],
    )
    _line(
        out,
        "integrity_events_total",
        "integrity events by kind (fault, check, recovery)",
        "counter",
        [({"kind": k}, n) for k, n in sorted(runner.event_kinds.items())],
    )
    _speculative(out, runner, engine)
    _line(out, "evictions_total", "L1 pages evicted", "counter", [({}, snap.evictions)])
    _line(
        out,
        "transfers_in_flight",
        "tier copies in flight",
        "gauge",
        [({}, snap.transfers_in_flight)],
    )
    stats = _expert_stats(engine)
    if stats is not None:
        _line(
            out,
            "expert_cache_hit_ratio",
            "routed-expert cache hit rate",
            "gauge",
            [({}, round(stats.hit_rate, 6))],
        )
        _line(
            out,
            "expert_cache_hits_total",
            "routed-expert cache hits",
            "counter",
            [({}, stats.total_hits)],
        )
        _line(
            out,
            "expert_cache_misses_total",
            "routed-expert cache misses",
            "counter",
            [({}, stats.total_misses)],
        )
    else:
        heat = sum(map(sum, snap.expert_heat))
        _line(
            out,
            "expert_cache_hits_total",
            "routed-expert cache hits (experts resident: 0)",
            "counter",
            [({}, heat)],
        )
    return "\n".join(out) + "\n"


def _speculative(out: list[str], runner, engine) -> None:
    """Speculative decoding (app/speculation.py), summed over finished requests."""
    spec = runner.spec
    k = getattr(engine, "draft_tokens", 0) or 0
    _line(out, "speculative_draft_tokens", "MTP draft tokens per step (0: off)", "gauge", [({}, k)])
    for key, help_ in (
        ("steps", "verify steps with drafts, finished requests"),
        ("drafted", "MTP draft tokens verified, finished requests"),
        ("accepted", "MTP draft tokens accepted, finished requests"),
    ):
        name = f"speculative_{key}_total" if key == "steps" else f"speculative_{key}_tokens_total"
        _line(out, name, help_, "counter", [({}, spec[key])])
    steps = spec["steps"]
    length = round((spec["accepted"] + steps) / steps, 6) if steps else 0
    rate = round(spec["accepted"] / spec["drafted"], 6) if spec["drafted"] else 0
    _line(
        out,
        "speculative_accept_length",
        "mean tokens per verify step, finished requests (0: none)",
        "gauge",
        [({}, length)],
    )
    _line(
        out,
        "speculative_accept_rate",
        "accepted / drafted tokens, finished requests",
        "gauge",
        [({}, rate)],
    )
    _line(
        out,
        "speculative_acceptance_detections_total",
        "finished requests the acceptance detector flagged",
        "counter",
        [({}, spec["flagged"])],
    )


def _expert_stats(engine):
    """The expert cache's immutable stats when experts are offloaded, else None."""
    plan = getattr(engine, "weight_plan", None)
    return plan.stats() if plan is not None else None
