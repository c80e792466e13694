"""`kvscope bench`: kvscope against transformers and against the device's physical floors.

One process loads the model twice (kvscope's engine and transformers), feeds both the same seeded
prompts (same length, no padding) and greedy-decodes exactly --decode-tokens tokens per prompt at
batch 1 and batch 8. Every run gets fresh prompts (kvscope's prefix cache would otherwise serve
repeats from L1), the same ones for every contender. Every timed shape of every contender is
warmed up first; the timed runs are interleaved (rotating order) so machine noise hits all alike.

transformers runs at its fastest path on the device: each `experts_implementation` (eager,
grouped_mm, batched_mm; dynamic cache) is warmed up and tried, the fastest per shape is timed
(`--peers all` times every variant; `--peer-compile` adds static cache + torch.compile), and eager
always is. Then the cached-prefix TTFT rows (app/bench_cached.py) and the floors. Figures:
app/bench_figures.py; floors: app/bench_floors.py; the printed report: app/bench_report.py.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from app import bench_cached, bench_llamacpp, bench_spec
from app.bench_figures import KV, build_figure, figure_specs, summary
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
from app.bench_llamacpp import LLAMACPP
from app.bench_report import report
from app.bench_runners import (
    COMPILE_VARIANT,
    EAGER,
    HF_VARIANTS,
    HFRunner,
    KvscopeRunner,
    Prompts,
    RunResult,
    agreement,
    engine_rate,
    select,
    serial,
)
from app.options import add_common, engine_config
from runtime.errors import KvscopeError
from runtime.model_config import load_config

BATCHES = (1, 8)


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
        choices=["fastest", "all", "none", "llamacpp"],
        help="transformers' fastest path + eager; every transformers variant + llama.cpp "
        "(skipped with a note if not built); nothing; llama.cpp only (`make llamacpp`)",
    )
    g.add_argument(
        "--peer-compile",
        action="store_true",
        help="also try transformers with static cache + torch.compile (minutes to build)",
    )
    g.add_argument("--no-cached", action="store_true", help="skip the cached-prefix TTFT rows")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    g.add_argument(
        "--spec-compare",
        default="default",
        metavar="VALUES",
        help="--speculative values to time side by side, e.g. off,1,2,3 (default: off,auto "
        "when the model has MTP layers); none: skip the speculative decoding rows",
    )


def _log(msg: str) -> None:
    sys.stderr.write(f"[bench] {msg}\n")
    sys.stderr.flush()


def _check_args(args, ctx: int) -> None:
    checks = [("--repeats", args.repeats, 1), ("--warmup", args.warmup, 1)]
    checks += [("--prompt-len", args.prompt_len, 1), ("--decode-tokens", args.decode_tokens, 2)]
    for flag, v, lo in checks + [("--threads", args.threads, 0)]:
        if v < lo:
            raise KvscopeError(f"{flag} {v}: must be >= {lo}")
    if args.prompt_len + args.decode_tokens > ctx:
        raise KvscopeError(
            f"--prompt-len + --decode-tokens = {args.prompt_len + args.decode_tokens} exceeds the "
            f"model's context of {ctx}"
        )


def _warm(runner, variant, prompts: Prompts, k: int, n: int) -> dict[str, RunResult]:
    """First run of every shape (kept: greedy agreement) plus k - 1 more warm-ups."""
    runner = select(runner, variant)
    first = {f"b{b}": runner.run(prompts(0, b), n) for b in BATCHES}
    for i in range(1, k):
        for b in BATCHES:
            runner.run(prompts(i, b), n)
    return first


def _settle_cpu_graph(kv: KvscopeRunner, prompts: Prompts, n: int) -> dict | None:
    """Wait until every decode shape the bench times runs compiled (runtime/models/cpu_graph.py:
    buckets compile in the background while steps run eagerly), so no timed step is eager."""
    g = kv.engine.cpu_graph
    if g is None:
        return None
    _log("compiling kvscope's CPU decode steps (AOTInductor, one library per shape bucket)")
    t0 = time.perf_counter()
    rounds = iter(range(4))

    def workload() -> None:  # every timed shape, fresh prompts each round
        i = next(rounds)
        for b in BATCHES:
            kv.run(prompts(40_000 + i * 10 + b, b), n)

    if not g.warm(workload):
        raise KvscopeError("bench: compiling the CPU decode graph took over 30 min")
    if g.failed:
        _log(f"kvscope's CPU decode graph failed to compile, decode runs eagerly: {g.failed}")
    return {
        "enabled": g.failed is None,
        "buckets": [list(x) for x in g.buckets_ready],
        "compile_s": round(time.perf_counter() - t0, 1),
        "failed": g.failed,
    }


def _setup_llamacpp(lc, args, quant: str, dtype, prompts: Prompts, n: int):
    """GGUF at kvscope's precision (cached), the runner, one untimed run per shape (the tools
    warm up on their own too; this one pages the GGUF in)."""
    gtype = bench_llamacpp.gguf_type(quant, dtype)
    gguf = bench_llamacpp.ensure_gguf(lc, Path(args.model), gtype, _log)
    runner = bench_llamacpp.LlamaCppRunner(lc, gguf, torch.get_num_threads(), gtype)
    _log(f"llama.cpp: {gguf.name}, {runner.threads} threads; warming up")
    for b in BATCHES:
        runner.run(prompts(0, b), n)
    info = {
        "gguf": str(gguf),
        "gguf_type": gtype,
        "gguf_bytes": gguf.stat().st_size,
        "threads": runner.threads,
        "sdist": f"llama-cpp-python {bench_llamacpp.LLAMA_VERSION}",
        "commands": {
            f"b{b}": [" ".join(c) for c in runner.bench_commands(b, args.prompt_len, n)]
            for b in BATCHES
        },
    }
    return runner, info


def weight_bytes_per_param(quant: str, dtype_bytes: int) -> float:
    """Bytes per weight the decode floor counts: the dtype's, or the --quant format's (int8: one
    byte + a per-row scale; int4 / nf4: half a byte + per-group scale and zero, ~3 bytes per
    128 weights; the embedding row and the few tensors kept in the dtype are counted at the
    format's rate too: a floor slightly above the true one, never below)."""
    return {"int8": 1.0, "int4": 0.5 + 3 / 128, "nf4": 0.5 + 4 / 64}.get(quant, float(dtype_bytes))


def workload_kv_bytes(cfg, econf, plen: int, n: int) -> int:
    """Bytes of an L1 pool holding twice the bench's largest batch of full sequences (prompt +
    decode + speculative look-ahead), MTP planes included: the bench gives kvscope the KV
    memory its workload needs, as it gives llama.cpp a context (-c) of the workload's size,
    instead of the engine's default (room for --max-running contexts of the model's maximum
    length: 511 MB on cpu-mini), so the peak-memory figure compares like with like."""
    from runtime.kv.pool import KVPool

    layers = cfg.num_layers + cfg.num_nextn_predict_layers
    bpp = KVPool(layers, 1, econf.page_size, cfg.plane_widths(), torch.float32, "meta")
    pages = max(BATCHES) * -(-(plen + n + 16) // econf.page_size)
    return 2 * pages * bpp.bytes_per_page  # fp32 bytes: room for any KV dtype


def run_bench(args, argv: list[str]) -> dict:
    econf = engine_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.model)
    _check_args(args, cfg.max_position_embeddings)
    n, plen = args.decode_tokens, args.prompt_len
    seed = args.seed
    if econf.kv_disk:  # a disk cache that outlives this run must not serve our "cold" prompts
        seed = args.seed * 1_000_003 + random.SystemRandom().getrandbits(31)
    prompts = Prompts(seed, cfg.vocab_size, plen)
    notes: list[str] = []
    if econf.kv_mem is None:  # like llama.cpp's -c: the pool this workload needs, not a default
        econf = replace(econf, kv_mem=workload_kv_bytes(cfg, econf, plen, n))
        notes.append(
            f"KV pool sized to the workload: {econf.kv_mem / 2**20:.0f} MB "
            f"(2x batch {max(BATCHES)} x {plen + n} tokens of fp32 KV; --kv-mem to choose)"
        )
    spec_values = bench_spec.spec_values(
        args.spec_compare, cfg.num_nextn_predict_layers > 0, econf.resolve_device()
    )
    shapes = {f"b{b}": b for b in BATCHES}
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    llama = None
    if args.peers in ("llamacpp", "all"):  # before loading anything: a missing build fails fast
        llama, why = bench_llamacpp.available()
        if llama is None and args.peers == "llamacpp":
            raise KvscopeError(why)
        if llama is None:
            notes.append(f"llama.cpp skipped: {why}")
            _log(notes[-1])

    memory: dict[str, dict[str, float]] = {}
    first: dict[str, dict[str, RunResult]] = {}  # contender -> shape -> first warm-up run
    probe = MemoryProbe(econf.resolve_device())
    _log(f"loading kvscope from {args.model}")
    probe.start()
    kv = KvscopeRunner(args.model, econf, max(BATCHES), plen)
    spec_k = kv.engine.draft_tokens  # MTP draft tokens of the kvscope contender (0: off)
    first[KV] = _warm(kv, KV, prompts, args.warmup, n)
    graph_info = _settle_cpu_graph(kv, prompts, n)
    memory[KV] = probe.stop()
    device, dtype = kv.device, kv.dtype
    runners: dict[str, object] = {KV: kv}

    timed: dict[str, list[str]] = {s: [KV] for s in shapes}
    trial: dict[str, dict[str, float]] = {s: {} for s in shapes}
    attn, turn = None, 10_000  # prompt index for the trial runs
    llama_info = None
    if llama is not None:
        llama_runner, llama_info = _setup_llamacpp(llama, args, econf.quant, dtype, prompts, n)
        runners[LLAMACPP] = llama_runner
        for s in shapes:
            timed[s].append(LLAMACPP)
    if args.peers in ("fastest", "all"):
        _log("loading transformers")
        import transformers  # noqa: F401 - imported outside the memory probe

        probe.start()
        hf = HFRunner(args.model, cfg.arch, dtype, device, EAGER)
        loaded = probe.stop()
        attn, variants = hf.attn, list(HF_VARIANTS)
        for v in HF_VARIANTS:  # memory per variant: the load plus that variant's peak on top
            probe.start()
            runners[v] = hf
            first[v] = _warm(hf, v, prompts, args.warmup, n)
            memory[v] = {d: loaded[d] + x for d, x in probe.stop().items()}
        if args.peer_compile:
            _log("compiling transformers (static cache + torch.compile); this takes a while")
            probe.start()
            runners[COMPILE_VARIANT] = HFRunner(
                args.model, cfg.arch, dtype, device, COMPILE_VARIANT
            )
            first[COMPILE_VARIANT] = _warm(
                runners[COMPILE_VARIANT], COMPILE_VARIANT, prompts, max(args.warmup, 2), n
            )  # prefill and decode graphs of both shapes built before anything is timed
            memory[COMPILE_VARIANT] = probe.stop()  # its own model instance, plus the compile
            variants.append(COMPILE_VARIANT)
        for s, b in shapes.items():
            for v in variants:
                runner = select(runners[v], v)
                runner.run(prompts(turn, b), n)  # one more warm run after switching variants
                trial[s][v] = max(runner.run(prompts(turn + i, b), n).decode_tok_s for i in (1, 2))
                turn += 3
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
        for s, b in shapes.items():
            batch = prompts(20_000 + r * 10 + b, b)
            order = timed[s][r % len(timed[s]) :] + timed[s][: r % len(timed[s])]
            for c in order:
                res = select(runners[c], c).run(batch, n)
                if c == KV and any(res.extra["cached_tokens"].values()):
                    raise KvscopeError(
                        f"bench: a cold kvscope run hit the prefix cache: {res.extra}"
                    )
                runs[c].setdefault(s, []).append(res)
                if c == KV and s == "b1":
                    reported.append(engine_rate(kv.engine))
        _log(f"repeat {r + 1}/{args.repeats} done")
    expert_stats = kv.expert_cache.stats().summary() if kv.expert_cache is not None else None

    cached_record: list[dict] = []
    cached_tiers: tuple[str, ...] = ()
    cacheable = (plen - 1) // econf.page_size * econf.page_size  # full pages before the last
    if not args.no_cached and cacheable == 0:
        _log(
            f"no cached-prefix rows: a {plen}-token prompt has no full {econf.page_size}-token page"
        )
    if not args.no_cached and cacheable:
        _log("cached-prefix TTFT (L1, L2, L3)")
        tconf, tmp = bench_cached.tier_config(econf)
        tconf = replace(tconf, cpu_graph="off")  # TTFT only: no compile thread beside the timing
        tier_runner = kv
        try:
            if not bench_cached.has_tiers(econf):  # its own engine; the first one is let go
                kv.close()
                runners.pop(KV)
                kv = None
                gc.collect()
                tier_runner = KvscopeRunner(args.model, tconf, 1, plen)
            got, cached_record = bench_cached.measure_cached_ttft(
                tier_runner, lambda i: prompts(30_000 + i, 1)[0], args.repeats, args.warmup
            )
            tier_runner.close()
        finally:
            bench_cached.cleanup(tmp)
        for tier, rs in got.items():
            runs[KV][f"cached_{tier}"] = rs
            for c in runs:  # a transformers user re-pays the cold prefill
                if c != KV and "b1" in runs[c]:
                    runs[c][f"cached_{tier}"] = runs[c]["b1"]
        cached_tiers = tuple(got)
    if kv is not None:
        kv.close()

    speculation = None
    if spec_values:  # decode with and without the MTP layer's drafts, side by side
        speculation = bench_spec.measure_speculation(
            args.model,
            econf,
            spec_values,
            prompts,
            BATCHES,
            n,
            args,
            lambda r: _settle_cpu_graph(r, prompts, n),
            _log,
        )
    elif cfg.num_nextn_predict_layers == 0:
        notes.append("no speculative decoding rows: the model has no MTP layers")

    _log("measuring copy bandwidth")
    bw = copy_bandwidth(device)
    floors_info = {"copy_bandwidth_bytes_s": summary(bw), "basis": "fastest copy sample"}
    if device.type == "cuda":
        floors_info["h2d_pinned_bytes_s"] = summary(h2d_bandwidth(device, True))
        floors_info["h2d_pageable_bytes_s"] = summary(h2d_bandwidth(device, False))
    dbytes = weight_bytes_per_param(econf.quant, torch.empty((), dtype=dtype).element_size())
    floors = {f"b{b}": decode_floor_tok_s(cfg, b, dbytes, max(bw)) for b in BATCHES}
    floors_info["decode_floor_tok_s"] = floors

    agree = {"dtype": str(dtype).replace("torch.", ""), "batch1": {}, "batch8": {}}
    if llama_info is not None:  # llama.cpp's greedy tokens from the same prompt ids as ours
        lr = runners[LLAMACPP]
        got = lr.greedy(prompts(0, 1)[0], n)
        agree["llamacpp"] = {
            "gguf_type": lr.gtype,
            **agreement(first[KV]["b1"].tokens[0], got),
            "kvscope_tokens": first[KV]["b1"].tokens[0],
            "llamacpp_tokens": got,
        }
        memory[LLAMACPP] = {"cpu": float(lr.peak_rss)}  # the tools' own peak RSS
        llama_info.update(build=lr.build, tool_rows=lr.raw, peak_rss_bytes=lr.peak_rss)
        llama_info["batched_bench_retries"] = lr.retries
        llama_info["peak_rss_bytes_by_tool"] = lr.peak_rss_by_tool
    for c, by in first.items():
        if c != KV:
            agree["batch1"][c] = agreement(first[KV]["b1"].tokens[0], by["b1"].tokens[0])
            pairs = zip(first[KV]["b8"].tokens, by["b8"].tokens, strict=True)
            agree["batch8"][c] = [agreement(a, b)["matching"] for a, b in pairs]

    na = {}
    if not cached_tiers:
        why = "--no-cached" if args.no_cached else f"no full page in a {plen}-token prompt"
        na.update({f"ttft_{t.lower()}": f"n/a ({why})" for t in bench_cached.TIERS})
    if expert_stats is None:
        na["expert_hit_rate"] = "n/a (experts resident; offload with --expert-cache)"
    specs = figure_specs(BATCHES, device.type, cached_tiers, expert_stats is not None)
    figures = [build_figure(sp, runs, memory, floors, na) for sp in specs]
    counts = param_counts(cfg)
    machine = machine_info(device)
    machine["load_average_start"] = list(load0) if load0 else None
    settings = {"model": str(args.model), "device": str(device), "dtype": agree["dtype"]}
    settings.update(
        threads=torch.get_num_threads(),
        repeats=args.repeats,
        warmup=args.warmup,
        prompt_len=plen,
        decode_tokens=n,
        batches=list(BATCHES),
        peers=args.peers,
        peer_compile=args.peer_compile,
        seed=seed,
        page_size=econf.page_size,
        kvscope_max_batch_tokens=max(econf.max_batch_tokens, max(BATCHES) * plen),
        transformers_attn_implementation=attn,
        expert_cache=econf.expert_cache,
        quant=econf.quant,
        kvscope_cpu_graph=graph_info,
        kvscope_speculative=spec_k,
        spec_compare=args.spec_compare,
    )
    return {
        "schema": "kvscope-bench/1",
        "command": "kvscope " + " ".join(argv),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "versions": versions(),
        "settings": settings,
        "model": {
            "arch": cfg.arch,
            "params_total": counts["total"],
            "active_params_per_token": counts["active_per_token"],
            "active_parts": counts["active_parts"],
            "dtype_bytes": dbytes,
            "weight_bytes_per_step": {f"b{b}": bytes_per_step(cfg, b, dbytes) for b in BATCHES},
        },
        "floors": floors_info,
        "llamacpp": llama_info,
        "notes": notes,
        "peer_selection": {"timed": timed, "trial_decode_tok_s": trial},
        "agreement": agree,
        "memory_bytes": memory,
        "cached_ttft": {"prompt_tokens_cacheable": cacheable, "runs": cached_record},
        "expert_cache": expert_stats,
        "engine_reported_decode_tok_s": reported,
        "runs": {c: {s: [serial(x) for x in rs] for s, rs in by.items()} for c, by in runs.items()},
        "figures": figures,
        "speculation": speculation,
    }


def cmd_bench(args, argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    res = run_bench(args, argv)
    if args.json:  # first: the figures survive whatever the report does
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        _log(f"wrote {args.json}")
    print(report(res))
    return 0
