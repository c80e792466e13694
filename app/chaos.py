"""`kvscope chaos`: many concurrent requests under KV pressure with injected faults.

For each fault kind: one clean run (protections on, nothing injected) gives every request's
reference output; the injected run is compared with it token by token. Reported per kind
(app/chaos_report.py): injected, changed (the bytes a request read differed from the correct
ones) and changed/injected, detections by detector and their delay, recovered, prevented,
corrupt_tokens_emitted, false_positives (violations flagged in the clean run), clean_tokens;
and overhead_pct (decode time with the default checks vs with checks off, same prompts).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from app.chaos_report import acceptance_by_prompt, acceptance_vs_clean, kind_row, print_report
from runtime.engine import Engine, EngineConfig
from runtime.integrity.config import FAULT_KINDS, IntegrityConfig, parse_inject

SYSTEM = "You are a helpful assistant. Answer briefly and precisely. "
TOPICS = [
    "What does the sort method do?",
    "Explain what a dictionary is.",
    "How do I open a file?",
    "What is an exception?",
    "Describe the list type.",
    "What does the print function return?",
    "How are strings compared?",
    "What is a module?",
]


def add_chaos_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=64, help="concurrent requests per run")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--bypass-drain", action="store_true", help="late writers skip safe reclaim")
    p.add_argument(
        "--clean-only",
        action="store_true",
        help="only the clean run with the default checks: count false positives",
    )
    p.add_argument(
        "--soak",
        type=int,
        metavar="N",
        help="soak instead: N tiny requests (shared prefixes, random aborts and timeouts) "
        "through small L1/L2 and an L3, then a leak audit (app/soak.py)",
    )
    p.set_defaults(page_size=16, max_running=8)  # small pages: prefixes churn through tiers


def _prompts(engine: Engine, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if engine.tokenizer is not None:
            variant = i % 6  # six long system prompts: more prefix pages than L1 holds
            msg = [{"role": "system", "content": f"{variant}. " + SYSTEM * (2 + variant)}]
            msg.append({"role": "user", "content": rng.choice(TOPICS)})
            out.append(engine.encode_prompt(messages=msg))
        else:
            vocab = engine.model_config.vocab_size  # six prefixes, as above: 2 to 7 pages
            variant = i % 6
            shared = [(7 * k + 31 * variant) % (vocab - 2) + 2 for k in range(16 * (2 + variant))]
            out.append(shared + [rng.randrange(2, vocab) for _ in range(rng.randint(1, 8))])
    return out


def _run(model: str, base: EngineConfig, prompts, max_new: int) -> tuple[Engine, dict, float]:
    e = Engine(model, base)
    ids = [e.submit(prompt_ids=p, max_new_tokens=max_new, ignore_eos=True) for p in prompts]
    t0 = time.perf_counter()
    e.run_until_done()
    e.close()
    return e, {i: e.request(i) for i in ids}, time.perf_counter() - t0


def _warm_cpu_graphs(model: str, cfg: EngineConfig, prompts, max_new: int, tmp: Path) -> None:
    """Compile the CPU decode buckets this workload steps through (runtime/models/cpu_graph.py;
    kept for the process) before anything is timed, so every timed run decodes compiled."""
    e = Engine(model, replace(cfg, kv_disk=str(tmp / "warm")))
    if e.cpu_graph is not None:

        def workload() -> None:
            for p in prompts:
                e.submit(prompt_ids=p, max_new_tokens=max_new, ignore_eos=True)
            e.run_until_done()

        e.cpu_graph.warm(workload)
    e.close()


def acceptance_thresholds(args) -> dict:
    """The acceptance detector's IntegrityConfig fields for chaos runs: the --accept-* flags;
    unless --accept-after is given, a request is judged from half its tokens on (chaos requests
    are far shorter than the incident's 128 tokens)."""
    from app.options import speculative_options

    accept = speculative_options(args)["accept"]
    if getattr(args, "accept_after", None) in (None, str(IntegrityConfig.accept_after_tokens)):
        accept["accept_after_tokens"] = max(4, args.max_new_tokens // 2)
    return accept


def pressure_config(probe: Engine, args, prompts, kv_dir: str) -> EngineConfig:
    """L1 holds about half of what the running requests need; L2 a few requests' worth."""
    bpp = probe.pool.bytes_per_page
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    per_req = -(-longest // args.page_size)
    from app.options import speculative_options

    return EngineConfig(
        device=args.device,
        dtype=args.dtype,
        page_size=args.page_size,
        speculative=speculative_options(args)["speculative"],
        cpu_graph=args.cpu_graph,
        integrity=IntegrityConfig(**acceptance_thresholds(args)),
        kv_mem=max(per_req + 2, args.max_running * per_req // 2) * bpp,  # far below the need
        kv_host_mem=2 * per_req * bpp,
        kv_disk=kv_dir,
        max_running=args.max_running,
    )


def chaos_report(args) -> dict:
    kinds = parse_inject(args.inject) if args.inject else {k: 0.0 for k in FAULT_KINDS}
    kinds = {k: (r or parse_inject([k])[k]) for k, r in kinds.items()}
    report = {"model": args.model, "requests": args.requests, "unsafe": args.unsafe, "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        probe = Engine(args.model, EngineConfig(device=args.device, page_size=args.page_size))
        prompts = _prompts(probe, args.requests, args.seed)
        base = pressure_config(probe, args, prompts, str(Path(tmp) / "clean"))
        off = replace(base, unsafe=True)
        _warm_cpu_graphs(args.model, base, prompts, args.max_new_tokens, Path(tmp))
        times = {"on": [], "off": []}
        steps = {"compiled": 0, "eager": 0}  # timed runs' eligible decode steps, by path
        for i in range(3):  # interleaved, fresh L3 each time; the first pair is a warm-up
            for mode, cfg in (("off", off), ("on", base)):
                cfg = replace(cfg, kv_disk=str(Path(tmp) / f"{mode}{i}"))
                e, res, dt = _run(args.model, cfg, prompts, args.max_new_tokens)
                times[mode].append(dt)
                if i and e.cpu_graph is not None:
                    steps["compiled"] += e.cpu_graph.steps_compiled
                    steps["eager"] += e.cpu_graph.steps_eager
                if mode == "on":
                    clean, clean_events = res, list(e.monitor.events)
        t_on, t_off = min(times["on"][1:]), min(times["off"][1:])
        ref = {tuple(r.prompt_ids): r.output_ids for r in clean.values()}
        clean_accept = acceptance_by_prompt(clean, clean_events)
        false_pos = sum(len(r.violations) for r in clean.values())
        flags = [ev.detail for ev in clean_events if ev.kind == "acceptance"]
        report["clean"] = {
            "tokens": sum(len(r.output_ids) for r in clean.values()),
            "false_positives": false_pos,
            "overhead_pct": round(100 * (t_on - t_off) / t_off, 1) if t_off > 0 else None,
            "seconds_on_off": [round(t_on, 3), round(t_off, 3)],
            "decode_steps_cpu_graph": steps,
            # the acceptance detector on the clean run: requests judged garbled (drafts keep
            # failing) or looping (a small model's text loops; not credited to faults)
            "acceptance_flags": {
                "garbled": sum(f.startswith("accept length") for f in flags),
                "looping": sum(f.startswith("accept rate") for f in flags),
            },
        }
        for kind, rate in kinds.items():
            ic = replace(base.integrity, faults={kind: rate}, bypass_drain=args.bypass_drain)
            cfg = replace(base, kv_disk=str(Path(tmp) / kind), integrity=ic, unsafe=args.unsafe)
            e, res, _ = _run(args.model, cfg, prompts, args.max_new_tokens)
            report["kinds"][kind] = kind_row(e, kind, res, ref, false_pos)
            report["kinds"][kind]["acceptance_vs_clean"] = acceptance_vs_clean(
                res, list(e.monitor.events), ref, clean_accept
            )
    report["overhead_pct"] = report["clean"]["overhead_pct"]
    return report


def clean_report(args) -> dict:
    """Clean run only (default sampling rates, nothing injected): false positives over the
    tokens produced, and which checks ran how often."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Engine(args.model, EngineConfig(device=args.device, page_size=args.page_size))
        prompts = _prompts(probe, args.requests, args.seed)
        base = pressure_config(probe, args, prompts, str(Path(tmp) / "clean"))
        e, res, dt = _run(args.model, base, prompts, args.max_new_tokens)
    events = [ev.kind for ev in e.monitor.events]
    return {
        "model": args.model,
        "requests": args.requests,
        "clean_tokens": sum(len(r.output_ids) for r in res.values()),
        "checked_tokens": sum(r.checked_tokens for r in res.values()),
        "false_positives": sum(len(r.violations) for r in res.values()),
        "suspect_tokens_requests": sum(r.verdict != "ok" for r in res.values()),
        "events": {k: events.count(k) for k in set(events)},
        "shadow_recomputes": e.monitor.shadow_runs,
        "shadow_skipped_over_budget": e.monitor.shadow_skipped,
        "seconds": round(dt, 1),
    }


def cmd_chaos(args) -> int:
    if args.soak is not None:
        from app.soak import print_soak, run_soak

        if args.soak < 1:
            from runtime.errors import KvscopeError

            raise KvscopeError(f"--soak {args.soak}: must be >= 1")
        rep = run_soak(
            args.model,
            args.soak,
            device=args.device,
            page_size=4,
            max_running=args.max_running,
            warmup=min(1000, max(args.soak // 10, 1)),
            sample_every=max(args.soak // 20, 1),
            seed=args.seed,
            cpu_graph=args.cpu_graph,
            log=lambda pt: print(f"  ... {pt}", flush=True),
        )
        print_soak(rep)
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
        return 0 if rep["ok"] else 1
    if args.clean_only:
        rep = clean_report(args)
        print(json.dumps(rep, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
        return 0
    rep = chaos_report(args)
    print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    return 0
