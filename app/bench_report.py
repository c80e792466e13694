"""The text report `kvscope bench` prints: settings, machine, floors, the figures table and the
greedy agreement lines."""

from __future__ import annotations

from app.bench_figures import format_table
from app.bench_spec import report_lines as spec_lines


def report(res: dict) -> str:
    m, s, v = res["machine"], res["settings"], res["versions"]
    bw = res["floors"]["copy_bandwidth_bytes_s"]["max"] / 1e9
    load = m.get("load_average")
    lines = [
        f"kvscope bench: {s['model']} ({res['model']['arch']}), {s['device']} {s['dtype']}, "
        f"{s['threads']} threads, prompt {s['prompt_len']}, decode {s['decode_tokens']}, "
        f"{s['repeats']} repeats: median [min-max]",
        f"machine: {m['cpu']} ({m['cpu_cores_usable']} usable cores)"
        + (f", load average {load[0]:.1f}" if load else "")
        + (f", {m['gpu']}" if m.get("gpu") else ""),
        f"versions: torch {v['torch']}, transformers {v['transformers']}, python {v['python']}, "
        f"kvscope {v.get('kvscope_git') or v.get('kvscope')}"
        + (" (+ uncommitted runtime changes)" if v.get("kvscope_git_dirty") else ""),
        f"floors: copy bandwidth {bw:.1f} GB/s (read+written); weight bytes per token "
        f"{res['model']['weight_bytes_per_step']['b1'] / 1e6:.2f} MB -> decode floor "
        + ", ".join(f"{k} {x:,.0f} tok/s" for k, x in res["floors"]["decode_floor_tok_s"].items()),
    ]
    for key, name in (("h2d_pinned_bytes_s", "pinned"), ("h2d_pageable_bytes_s", "pageable")):
        if key in res["floors"]:
            lines.append(f"  host-to-device, {name}: {res['floors'][key]['max'] / 1e9:.1f} GB/s")
    if load and s["threads"] > 1 and load[0] > m["cpu_cores_usable"]:
        lines.append(
            f"note: load average {load[0]:.1f} on {m['cpu_cores_usable']} cores with "
            f"{s['threads']} torch threads: intra-op threads stall each other; try --threads 1"
        )
    if s.get("expert_cache") or s.get("quant", "none") != "none":
        lines.append(
            "note: kvscope runs with --expert-cache / --quant; transformers runs with every weight "
            "resident and unquantized (its accelerate-offload and bitsandbytes peers are not wired)"
        )
    graph = s.get("kvscope_cpu_graph")
    if graph:
        from runtime.models.runner import bucket_name

        buckets = ", ".join(bucket_name(b) for b in graph["buckets"]) or "none"
        lines.append(
            "kvscope decode: "
            + (
                f"compiled CPU graphs (batch x context buckets {buckets}; "
                f"compiled in {graph['compile_s']:.0f} s before timing)"
                if graph["enabled"]
                else f"eager (CPU graph compile failed: {graph['failed']})"
            )
        )
    if s.get("kvscope_speculative"):
        lines.append(
            f"kvscope decode: speculative, {s['kvscope_speculative']} MTP draft tokens per step "
            "(--speculative; the speculative decoding rows compare it with off)"
        )
    lc = res.get("llamacpp")
    if lc:
        lines.append(
            f"llama.cpp: {lc['sdist']} (build {lc.get('build')}), {lc['gguf_type'].upper()} GGUF "
            f"{lc['gguf_bytes'] / 1e6:,.0f} MB, {lc['threads']} threads; batch 1: llama-bench, "
            "batch 8: llama-batched-bench (8 sequences); memory: the tools' peak RSS"
        )
    lines += [f"note: {x}" for x in res.get("notes", [])]
    lines += ["", format_table(res["figures"]), ""]
    lines.append("ratio > 1: kvscope better (rates: kvscope / peer; times, memory: peer / kvscope)")
    ct = res["cached_ttft"]
    if ct["runs"]:
        lines.append(
            f"cached-prefix TTFT: {ct['prompt_tokens_cacheable']} of {s['prompt_len']} prompt "
            f"tokens served from the tier (whole {s['page_size']}-token pages before the last "
            "token); transformers has no prefix cache: its cold TTFT"
        )
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
    la = res["agreement"].get("llamacpp")
    if la:
        div = (
            ""
            if la["first_divergence"] is None
            else f", first divergence at {la['first_divergence']}"
        )
        lines.append(
            f"greedy agreement, batch 1: kvscope ({ag['dtype']}, --quant {s['quant']}) vs "
            f"llama.cpp {la['gguf_type'].upper()}: {la['matching']}/{la['tokens']} tokens{div}"
        )
    lines += spec_lines(res.get("speculation"))
    trial = res["peer_selection"]["trial_decode_tok_s"]
    if any(trial.values()):
        parts = [
            f"{k}: " + ", ".join(f"{v} {x:.1f}" for v, x in d.items()) for k, d in trial.items()
        ]
        lines.append("transformers trial, decode tok/s: " + "; ".join(parts))
    return "\n".join(lines)
