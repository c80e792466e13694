"""Figures of `kvscope bench`: which rows exist, how each is computed from the raw samples, and
how the table prints.

Every figure holds min/median/max over the repeats for kvscope and for each measured transformers
variant. "peer" is the variant with the best median for that figure (transformers' fastest path);
"eager" is transformers with eager experts. ratio > 1 means kvscope is better: kvscope / peer for
rates, peer / kvscope for times and memory. Ratios are always recomputed from the medians here.

A row that kvscope cannot measure yet carries `na` (a reason) instead of numbers. Adding a row
is one FigureSpec; the TTFT rows for cached prefixes become real when `CachedTTFT.measure` is
given by the engine (see app/bench.py: `cached_ttft`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from app.bench_runners import EAGER, RunResult

KV = "kvscope"
LLAMACPP = "llama.cpp"  # a peer of its own: never folded into "transformers fastest"
HICACHE_NA = "n/a (HiCache not enabled)"
OFFLOAD_NA = "n/a (experts resident; offload with --expert-cache)"


def summary(samples: list[float]) -> dict:
    return {
        "min": min(samples),
        "median": statistics.median(samples),
        "max": max(samples),
        "samples": list(samples),
    }


def ratio(kv: float, peer: float, better: str) -> float | None:
    """> 1 means kvscope is better."""
    num, den = (kv, peer) if better == "higher" else (peer, kv)
    return num / den if den > 0 else None


@dataclass(frozen=True)
class FigureSpec:
    key: str
    label: str
    unit: str  # "tok/s" | "ms" | "MB" | "%"
    better: str  # "higher" | "lower"
    shape: str | None = None  # which timed shape the figure reads: "b1", "b8", "cached_L1"...
    value: Callable[[RunResult], float] | None = None
    floor: bool = False  # compare with the weight-read decode floor
    source: str = "runs"  # "runs" | "memory:<device>" | "na"


def figure_specs(
    batches: tuple[int, ...],
    device_type: str,
    cached_tiers: tuple[str, ...] = (),
    expert_cache: bool = False,
) -> list[FigureSpec]:
    """cached_tiers: tiers whose cached-prefix TTFT kvscope measured (the others print n/a);
    expert_cache: kvscope ran with routed experts offloaded behind its expert cache."""
    specs = []
    for b in batches:
        specs.append(
            FigureSpec(
                f"prefill_b{b}",
                f"prefill, batch {b}",
                "tok/s",
                "higher",
                f"b{b}",
                lambda r: r.prefill_tok_s,
            )
        )
    for b in batches:
        specs.append(
            FigureSpec(
                f"decode_b{b}",
                f"decode, batch {b}",
                "tok/s",
                "higher",
                f"b{b}",
                lambda r: r.decode_tok_s,
                floor=True,
            )
        )
    for b in batches:
        specs.append(
            FigureSpec(
                f"decode_cpu_b{b}",
                f"decode per CPU-second, batch {b}",
                "tok/cpu-s",
                "higher",
                f"b{b}",
                lambda r: r.decode_tok_cpu_s,
            )
        )
    specs.append(
        FigureSpec(
            "ttft_cold",
            "TTFT, cold prefix, batch 1",
            "ms",
            "lower",
            f"b{batches[0]}",
            lambda r: r.prefill_s * 1e3,
        )
    )
    for tier in ("L1", "L2", "L3"):
        measured = tier in cached_tiers
        specs.append(
            FigureSpec(
                f"ttft_{tier.lower()}",
                f"TTFT, prefix cached in {tier}",
                "ms",
                "lower",
                f"cached_{tier}",
                lambda r: r.prefill_s * 1e3,
                source="runs" if measured else "na",
            )
        )
    for dev in ("cpu", "cuda") if device_type == "cuda" else ("cpu",):
        what = "host RSS" if dev == "cpu" else "cuda allocated"
        specs.append(
            FigureSpec(
                f"peak_mem_{dev}",
                f"peak memory, {dev} ({what})",
                "MB",
                "lower",
                source=f"memory:{dev}",
            )
        )
    specs.append(
        FigureSpec(
            "expert_hit_rate",
            "expert-cache hit rate, batch 1",
            "%",
            "higher",
            f"b{batches[0]}",
            lambda r: (
                None if r.extra.get("expert_hit_rate") is None else 100 * r.extra["expert_hit_rate"]
            ),
            source="runs" if expert_cache else "na",
        )
    )
    return specs


def build_figure(
    spec: FigureSpec,
    runs: dict[str, dict[int, list[RunResult]]],
    memory: dict[str, dict[str, float]],
    floors: dict[str, float],
    na: dict[str, str],
) -> dict:
    """runs[contender][shape] -> RunResults; memory[contender][device] -> bytes;
    floors[shape] -> decode tok/s floor; na[key] -> reason for a row that was not measured."""
    fig = {"key": spec.key, "label": spec.label, "unit": spec.unit, "better": spec.better}
    fig.update(kvscope=None, peer=None, ratio=None, eager=None, ratio_vs_eager=None, na=None)
    fig.update(floor=None, floor_fraction=None, peer_floor_fraction=None, variants={})
    fig.update(llamacpp=None, ratio_vs_llamacpp=None, llamacpp_floor_fraction=None)
    per: dict[str, list[float]] = {}
    if spec.source == "na":
        fig["na"] = na.get(spec.key, HICACHE_NA if spec.key.startswith("ttft") else OFFLOAD_NA)
        return fig
    if spec.source.startswith("memory:"):
        dev = spec.source.split(":", 1)[1]
        per = {c: [m[dev] / 1e6] for c, m in memory.items() if dev in m}
    else:
        values = {c: [spec.value(r) for r in by.get(spec.shape, [])] for c, by in runs.items()}
        per = {c: v for c, v in values.items() if v and None not in v}  # None: not measured
    if KV not in per:
        fig["na"] = "n/a (not measured)"
        return fig
    fig["kvscope"] = summary(per[KV])
    peers = {c: summary(v) for c, v in per.items() if c not in (KV, LLAMACPP)}
    fig["variants"] = peers
    if LLAMACPP in per:
        fig["llamacpp"] = summary(per[LLAMACPP])
        fig["ratio_vs_llamacpp"] = ratio(
            fig["kvscope"]["median"], fig["llamacpp"]["median"], spec.better
        )
    if peers:
        pick = max if spec.better == "higher" else min
        best = pick(peers, key=lambda c: peers[c]["median"])
        fig["peer"] = {"variant": best, **peers[best]}
        fig["ratio"] = ratio(fig["kvscope"]["median"], peers[best]["median"], spec.better)
        if EAGER in peers:
            fig["eager"] = peers[EAGER]
            fig["ratio_vs_eager"] = ratio(
                fig["kvscope"]["median"], peers[EAGER]["median"], spec.better
            )
    if spec.floor and spec.shape in floors:
        floor = floors[spec.shape]
        fig["floor"] = floor
        fig["floor_fraction"] = fig["kvscope"]["median"] / floor
        if fig["peer"]:
            fig["peer_floor_fraction"] = fig["peer"]["median"] / floor
        if fig["llamacpp"]:
            fig["llamacpp_floor_fraction"] = fig["llamacpp"]["median"] / floor
    return fig


# ------------------------------------------------------------------------------ printing


def _num(x: float, unit: str) -> str:
    if unit == "MB" or abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _cell(s: dict | None, unit: str) -> str:
    if not s:
        return "-"
    if s["min"] == s["max"]:
        return _num(s["median"], unit)
    return f"{_num(s['median'], unit)} [{_num(s['min'], unit)}-{_num(s['max'], unit)}]"


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_table(figures: list[dict]) -> str:
    head = [
        "figure",
        "kvscope",
        "transformers fastest",
        "path",
        "ratio",
        "tf eager",
        "ratio",
        "floor frac (kv/tf)",
    ]
    llama = any(f.get("llamacpp") for f in figures)  # its columns only when it ran
    if llama:
        head += ["llama.cpp", "ratio", "floor frac"]
    rows = []
    for f in figures:
        label = f"{f['label']} ({f['unit']})"
        if f["na"]:
            rows.append([label, f["na"]] + [""] * (len(head) - 2))
            continue
        u = f["unit"]
        frac = "-"
        if f["floor_fraction"] is not None:
            pf = f["peer_floor_fraction"]
            frac = f"{f['floor_fraction']:.1%} / " + ("-" if pf is None else f"{pf:.1%}")
        peer = f["peer"] or {}
        rows.append(
            [
                label,
                _cell(f["kvscope"], u),
                _cell(f["peer"], u),
                peer.get("variant", "-"),
                _x(f["ratio"]),
                _cell(f["eager"], u),
                _x(f["ratio_vs_eager"]),
                frac,
            ]
        )
        if llama:
            lf = f.get("llamacpp_floor_fraction")
            rows[-1] += [
                _cell(f.get("llamacpp"), u),
                _x(f.get("ratio_vs_llamacpp")),
                "-" if lf is None else f"{lf:.1%}",
            ]
    full = [r for r in rows if not r[1].startswith("n/a")] + [head]
    widths = [max(len(r[i]) for r in full) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        if r[1].startswith("n/a"):
            lines.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)
