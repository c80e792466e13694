"""`kvscope bench`: kvscope against transformers and against the device's physical floors.

One process loads the model twice (kvscope's engine and transformers), feeds both the same seeded
prompts (same-length, no padding) and greedy-decodes exactly --decode-tokens tokens per prompt at
batch 1 and batch 8. Every timed shape of every contender is warmed up first; the timed runs of
the contenders are interleaved (rotating order) so machine noise hits all of them alike.

transformers runs at its fastest path on the device: each `experts_implementation` (eager,
grouped_mm, batched_mm; dynamic cache) is warmed up and tried, and the fastest per shape is timed
(`--peers all` times every variant; `--peer-compile` adds static cache + torch.compile). Eager is
always timed too. See app/bench_figures.py for the figures and app/bench_floors.py for the floors.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from app.bench_figures import KV, build_figure, figure_specs, format_table
from app.bench_floors import (
    MemoryProbe,
    bytes_per_step,
    copy_bandwidth,
    decode_floor_tok_s,
    h2d_bandwidth,
    machine_info,
    param_counts,
    versions,
)
from app.bench_runners import (
    COMPILE_VARIANT,
    EAGER,
    HF_VARIANTS,
    HFRunner,
    KvscopeRunner,
    RunResult,
    agreement,
)
from app.options import add_common, engine_config
from runtime.config import load_config
from runtime.errors import KvscopeError

BATCHES = (1, 8)
CACHED_TIERS = ("L1", "L2", "L3")


def add_bench_args(p) -> None:
    add_common(p)
    g = p.add_argument_group("benchmark")
    g.add_argument("--json", metavar="FILE", help="write every result and sample as JSON")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per figure (after warm-up)")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs per shape and contender")
    g.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    g.add_argument("--decode-tokens", type=int, default=64, help="new tokens per prompt")
    g.add_argument(
        "--peers",
        default="fastest",
        choices=["fastest", "all", "none"],
        help="time transformers' fastest path + eager, every variant, or nothing",
    )
    g.add_argument(
        "--peer-compile",
        action="store_true",
        help="also try transformers with static cache + torch.compile (slow to build)",
    )
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts")


def cached_ttft(kv: KvscopeRunner, prompt: list[int], tier: str) -> RunResult | None:
    """TTFT with `prompt`'s prefix already cached in `tier`, or None while the engine has no
    prefix cache. When HiCache lands: run the prompt once, demote its pages to `tier`, then
    return `kv.run([prompt], 1)`; the rows of figure_specs turn real by themselves."""
    return None


def _log(msg: str) -> None:
    sys.stderr.write(f"[bench] {msg}\n")
    sys.stderr.flush()


def _check_args(args, ctx: int) -> None:
    for flag, v, lo in (
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 1),
        ("--prompt-len", args.prompt_len, 1),
        ("--decode-tokens", args.decode_tokens, 2),
        ("--threads", args.threads, 0),
    ):
        if v < lo:
            raise KvscopeError(f"{flag} {v}: must be >= {lo}")
    if args.prompt_len + args.decode_tokens > ctx:
        raise KvscopeError(
            f"--prompt-len + --decode-tokens = {args.prompt_len + args.decode_tokens} exceeds the "
            f"model's context of {ctx}"
        )


def _serial(r: RunResult) -> dict:
    return {
        "prefill_s": r.prefill_s,
        "decode_s": r.decode_s,
        "prefill_tok_s": r.prefill_tok_s,
        "decode_tok_s": r.decode_tok_s,
    }


def run_bench(args, argv: list[str]) -> dict:
    econf = engine_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.model)
    _check_args(args, cfg.max_position_embeddings)
    n, plen = args.decode_tokens, args.prompt_len
    g = torch.Generator().manual_seed(args.seed)
    lo = min(8, cfg.vocab_size - 1)  # keep clear of the special tokens at the start
    ids = torch.randint(lo, cfg.vocab_size, (max(BATCHES), plen), generator=g).tolist()
    shapes = {f"b{b}": ids[:b] for b in BATCHES}
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None

    memory: dict[str, dict[str, float]] = {}
    first: dict[str, dict[str, RunResult]] = {}  # contender -> shape -> first warm-up run
    probe = MemoryProbe(econf.resolve_device())
    _log(f"loading kvscope from {args.model}")
    probe.start()
    kv = KvscopeRunner(args.model, econf, max(BATCHES), plen)
    first[KV] = {s: kv.run(p, n) for s, p in shapes.items()}
    for _ in range(args.warmup - 1):
        for p in shapes.values():
            kv.run(p, n)
    memory[KV] = probe.stop()
    device, dtype = kv.device, kv.dtype
    runners: dict[str, object] = {KV: kv}

    timed: dict[str, list[str]] = {s: [KV] for s in shapes}
    trial: dict[str, dict[str, float]] = {s: {} for s in shapes}
    attn = None
    if args.peers != "none":
        _log("loading transformers")
        import transformers  # noqa: F401 - imported outside the memory probe

        probe.start()
        hf = HFRunner(args.model, cfg.arch, dtype, device, EAGER)
        attn = hf.attn
        variants = list(HF_VARIANTS)
        for v in HF_VARIANTS:
            hf.set_variant(v)
            runners[v] = hf
            first[v] = {s: hf.run(p, n) for s, p in shapes.items()}
            for _ in range(args.warmup - 1):
                for p in shapes.values():
                    hf.run(p, n)
        memory["transformers"] = probe.stop()
        if args.peer_compile:
            _log("compiling transformers (static cache + torch.compile); this takes a while")
            hfc = HFRunner(args.model, cfg.arch, dtype, device, COMPILE_VARIANT)
            runners[COMPILE_VARIANT] = hfc
            first[COMPILE_VARIANT] = {s: hfc.run(p, n) for s, p in shapes.items()}
            for _ in range(max(args.warmup, 1)):  # prefill and decode graphs both built
                for p in shapes.values():
                    hfc.run(p, n)
            variants.append(COMPILE_VARIANT)
        for s, p in shapes.items():
            for v in variants:
                runner = _set(runners[v], v)
                runner.run(p, n)  # one more warm run after switching variants
                trial[s][v] = max(runner.run(p, n).decode_tok_s for _ in range(2))
            if args.peers == "all":
                timed[s] += variants
            else:
                best = max(trial[s], key=trial[s].get)
                timed[s] += [best] + ([EAGER] if best != EAGER else [])
            _log(
                f"{s}: trial decode tok/s " + ", ".join(f"{v} {x:.1f}" for v, x in trial[s].items())
            )

    runs: dict[str, dict[str, list[RunResult]]] = {c: {} for c in runners}
    reported = []
    for r in range(args.repeats):
        for s, p in shapes.items():
            order = timed[s][r % len(timed[s]) :] + timed[s][: r % len(timed[s])]
            for c in order:
                runs[c].setdefault(s, []).append(_set(runners[c], c).run(p, n))
                if c == KV and s == "b1":
                    reported.append(kv.engine.snapshot().decode_tok_per_s)
        _log(f"repeat {r + 1}/{args.repeats} done")

    cached = {}
    for tier in CACHED_TIERS:
        res = [cached_ttft(kv, shapes["b1"][0], tier) for _ in range(args.repeats)]
        if all(x is not None for x in res):
            runs[KV][f"cached_{tier}"] = res
            cached[tier] = True
            for c in runs:  # a transformers user re-pays the cold prefill
                if c != KV and "b1" in runs[c]:
                    runs[c][f"cached_{tier}"] = runs[c]["b1"]

    _log("measuring copy bandwidth")
    bw = copy_bandwidth(device)
    floors_info = {"copy_bandwidth_bytes_s": _summ(bw), "basis": "fastest copy sample"}
    if device.type == "cuda":
        floors_info["h2d_pinned_bytes_s"] = _summ(h2d_bandwidth(device, True))
        floors_info["h2d_pageable_bytes_s"] = _summ(h2d_bandwidth(device, False))
    dbytes = torch.empty((), dtype=dtype).element_size()
    floors = {f"b{b}": decode_floor_tok_s(cfg, b, dbytes, max(bw)) for b in BATCHES}
    floors_info["decode_floor_tok_s"] = floors

    agree = {"dtype": str(dtype).replace("torch.", ""), "batch1": {}, "batch8": {}}
    for c, by in first.items():
        if c == KV:
            continue
        agree["batch1"][c] = agreement(first[KV]["b1"].tokens[0], by["b1"].tokens[0])
        pairs = zip(first[KV]["b8"].tokens, by["b8"].tokens, strict=True)
        agree["batch8"][c] = [agreement(a, b)["matching"] for a, b in pairs]

    specs = figure_specs(BATCHES, device.type, tuple(cached))
    figures = [build_figure(sp, runs, memory, floors, {}) for sp in specs]
    counts = param_counts(cfg)
    machine = machine_info(device)
    machine["load_average_start"] = list(load0) if load0 else None
    return {
        "schema": "kvscope-bench/1",
        "command": "kvscope " + " ".join(argv),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "versions": versions(),
        "settings": {
            "model": str(args.model),
            "device": str(device),
            "dtype": agree["dtype"],
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "prompt_len": plen,
            "decode_tokens": n,
            "batches": list(BATCHES),
            "peers": args.peers,
            "peer_compile": args.peer_compile,
            "seed": args.seed,
            "kvscope_max_batch_tokens": kv.engine.config.max_batch_tokens,
            "transformers_attn_implementation": attn,
        },
        "model": {
            "arch": cfg.arch,
            "params_total": counts["total"],
            "active_params_per_token": counts["active_per_token"],
            "active_parts": counts["active_parts"],
            "dtype_bytes": dbytes,
            "weight_bytes_per_step": {f"b{b}": bytes_per_step(cfg, b, dbytes) for b in BATCHES},
        },
        "floors": floors_info,
        "peer_selection": {"timed": timed, "trial_decode_tok_s": trial},
        "agreement": agree,
        "memory_bytes": memory,
        "engine_reported_decode_tok_s": reported,
        "runs": {
            c: {s: [_serial(x) for x in rs] for s, rs in by.items()} for c, by in runs.items()
        },
        "figures": figures,
    }


def _set(runner, contender: str):
    if contender != KV and contender != COMPILE_VARIANT:
        runner.set_variant(contender)
    return runner


def _summ(xs: list[float]) -> dict:
    from app.bench_figures import summary

    return summary(xs)


def report(res: dict) -> str:
    m, s, v = res["machine"], res["settings"], res["versions"]
    bw = res["floors"]["copy_bandwidth_bytes_s"]["max"] / 1e9
    lines = [
        f"kvscope bench: {s['model']} ({res['model']['arch']}), {s['device']} {s['dtype']}, "
        f"{s['threads']} threads, prompt {s['prompt_len']}, decode {s['decode_tokens']}, "
        f"{s['repeats']} repeats: median [min-max]",
        f"machine: {m['cpu']} ({m['cpu_cores_usable']} usable cores), "
        f"load avg {m['load_average'][0]:.1f}"
        if m.get("load_average")
        else f"machine: {m['cpu']}",
        f"versions: torch {v['torch']}, transformers {v['transformers']}, python {v['python']}",
        f"floors: copy bandwidth {bw:.1f} GB/s (read+written); weight bytes per token "
        f"{res['model']['weight_bytes_per_step']['b1'] / 1e6:.2f} MB -> decode floor "
        + ", ".join(f"{k} {x:,.0f} tok/s" for k, x in res["floors"]["decode_floor_tok_s"].items()),
    ]
    for key in ("h2d_pinned_bytes_s", "h2d_pageable_bytes_s"):
        if key in res["floors"]:
            lines.append(f"  {key[:-8]}: {res['floors'][key]['max'] / 1e9:.1f} GB/s")
    lines += ["", format_table(res["figures"]), ""]
    ag = res["agreement"]
    for c, a in ag["batch1"].items():
        div = (
            ""
            if a["first_divergence"] is None
            else f", first divergence at {a['first_divergence']}"
        )
        lines.append(
            f"greedy agreement, batch 1, {ag['dtype']}: kvscope vs transformers {c}: "
            f"{a['matching']}/{a['tokens']} tokens{div}"
        )
    if res["peer_selection"]["trial_decode_tok_s"].get("b1"):
        t = res["peer_selection"]["trial_decode_tok_s"]
        lines.append(
            "peer trial (decode tok/s): "
            + "; ".join(
                f"{s}: " + ", ".join(f"{v} {x:.1f}" for v, x in d.items()) for s, d in t.items()
            )
        )
    return "\n".join(lines)


def cmd_bench(args, argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    res = run_bench(args, argv)
    print(report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        _log(f"wrote {args.json}")
    return 0
