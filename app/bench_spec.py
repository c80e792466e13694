"""`kvscope bench`'s speculative decoding rows: decode with and without the MTP layer's drafts.

One engine per compared `--speculative` value (--spec-compare; default: off and auto when the
checkpoint has MTP layers), all fed the same fresh prompts per run, timed runs interleaved in
rotating order so machine noise hits every value alike; every shape warmed up first. Each run
reports decode tok/s and its accept length / rate (runtime/speculative.AcceptStats summed over
the batch's requests), and the greedy tokens of each value are compared with those of the
first value (speculation is lossless: they must match). No speed is asserted here.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from app.bench_figures import summary
from app.bench_runners import KvscopeRunner, Prompts, agreement
from app.options import parse_speculative
from runtime.errors import KvscopeError

SPEC_PROMPTS = 60_000  # prompt indices of these rows (apart from the other rows')


def spec_values(text: str, has_mtp: bool, device="cpu") -> list[int]:
    """--spec-compare 'off,auto' / 'off,1,2,3' / 'none' -> draft tokens per value (0 = off);
    [] when there is nothing to compare. 'default': off and auto when the model has MTP
    layers, nothing otherwise; auto is the engine's default on `device`."""
    from runtime.speculative import default_draft_tokens

    t = text.strip().lower()
    if t == "none" or (t == "default" and not has_mtp):
        return []
    parts = ["off", "auto"] if t == "default" else [x for x in t.split(",") if x.strip()]
    values: list[int] = []
    for part in parts:
        v = parse_speculative(part, "--spec-compare")
        v = (default_draft_tokens(device) if has_mtp else 0) if v is None else v
        if v and not has_mtp:
            raise KvscopeError(
                f"--spec-compare {text}: the model has no MTP layers; use --spec-compare none"
            )
        if v not in values:
            values.append(v)
    if len(values) < 2:
        raise KvscopeError(f"--spec-compare {text}: give at least two different values")
    return values


def label(k: int) -> str:
    return "off" if k == 0 else f"{k} draft" + ("s" if k > 1 else "")


def measure_speculation(
    model, econf, values: list[int], prompts: Prompts, batches, n: int, args, settle, log
) -> dict:
    """The rows' record: per shape and value the decode tok/s samples, accept length / rate
    per run, and greedy agreement with the first value. ``settle(runner)``: waits for the
    engine's compiled CPU decode steps (bench._settle_cpu_graph)."""
    runners: dict[int, KvscopeRunner] = {}
    try:
        for k in values:
            log(f"speculation: loading kvscope with --speculative {label(k)}")
            conf = replace(econf, speculative=k)
            runners[k] = KvscopeRunner(model, conf, max(batches), args.prompt_len)
            for i in range(args.warmup):
                for b in batches:
                    runners[k].run(prompts(SPEC_PROMPTS - 1000 + i * 10 + b, b), n)
            settle(runners[k])
        runs: dict[str, dict[int, list]] = {f"b{b}": {k: [] for k in values} for b in batches}
        for r in range(args.repeats):
            for b in batches:
                batch = prompts(SPEC_PROMPTS + r * 10 + b, b)
                order = values[r % len(values) :] + values[: r % len(values)]
                for k in order:
                    runs[f"b{b}"][k].append(runners[k].run(batch, n))
            log(f"speculation: repeat {r + 1}/{args.repeats} done")
    finally:
        for runner in runners.values():
            runner.close()
    return {"values": values, "shapes": {s: _shape(by, values) for s, by in runs.items()}}


def _accept(res) -> dict:
    a = res.extra.get("accept") or {"steps": 0, "drafted": 0, "accepted": 0}
    steps = a["steps"]
    return {
        **a,
        "accept_length": (a["accepted"] + steps) / steps if steps else None,
        "accept_rate": a["accepted"] / a["drafted"] if a["drafted"] else None,
    }


def _shape(by: dict[int, list], values: list[int]) -> dict:
    base = values[0]
    out = {}
    for k in values:
        rs = by[k]
        rates = [x.decode_tok_s for x in rs]
        acc = [_accept(x) for x in rs]
        steps = sum(a["steps"] for a in acc)
        accepted = sum(a["accepted"] for a in acc)
        drafted = sum(a["drafted"] for a in acc)
        pairs = [
            agreement(a, b)
            for x, y in zip(by[base], rs, strict=True)
            for a, b in zip(x.tokens, y.tokens, strict=True)
        ]
        out[label(k)] = {
            "draft_tokens": k,
            "decode_tok_s": summary(rates),
            "speedup_vs_" + label(base): statistics.median(rates)
            / statistics.median(x.decode_tok_s for x in by[base])
            if k != base
            else None,
            "accept_length": (accepted + steps) / steps if steps else None,
            "accept_rate": accepted / drafted if drafted else None,
            "runs": acc,
            "greedy_matching": sum(p["matching"] for p in pairs),
            "greedy_tokens": sum(p["tokens"] for p in pairs),
        }
    return out


def report_lines(spec: dict | None) -> list[str]:
    if not spec:
        return []
    base = label(spec["values"][0])
    lines = [
        "speculative decoding (MTP drafts; same prompts, interleaved): decode tok/s median "
        "[min-max], speedup vs " + base + ", accept length (tokens per verify step), rate"
    ]
    for shape, by in spec["shapes"].items():
        cells = []
        for name, row in by.items():
            d = row["decode_tok_s"]
            cell = f"{name} {d['median']:.1f} [{d['min']:.1f}-{d['max']:.1f}]"
            if row["draft_tokens"]:
                x = row[f"speedup_vs_{base}"]
                cell += f" x{x:.2f}" if x else ""
                if row["accept_length"] is not None:
                    cell += f", accept {row['accept_length']:.2f} ({row['accept_rate']:.0%})"
            cells.append(cell)
        lines.append(f"  {shape}: " + " | ".join(cells))
    same = [
        f"{name} {row['greedy_matching']}/{row['greedy_tokens']} ({shape})"
        for shape, by in spec["shapes"].items()
        for name, row in by.items()
        if row["draft_tokens"] != spec["values"][0]
    ]
    lines.append(f"  greedy tokens equal to {base}'s: " + ", ".join(same))
    return lines
