"""The five sections of `kvscope gpu-check`, each run in its own process by app/gpu_check.py.

    python -m app.gpu_sections NAME RUN_DIR PART_JSON [--rehearse]

A section writes its figures to PART_JSON (atomically) as soon as each one is measured, so a
section killed at its time limit still leaves what it had. RUN_DIR is shared by the sections of
one run: the "mini" checkpoint is written there once (random weights drawn on the device) and
reused. `--rehearse` runs the same code on the CPU at toy sizes (tiny models, the Triton
interpreter for kernels, torch.compile with the "eager" backend): seconds per section.

Models are driven only through public entry points: Engine / EngineConfig (via the bench's
KvscopeRunner), transformers (via HFRunner), the kernels' wrappers and references.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

SECTIONS = ("kernels", "mini", "hicache", "integrity", "offload")

# "mini" of ../shared/ANCHORS.md: GLM-5 (glm_moe_dsa) at reduced width, 6.43 B parameters.
MINI = dict(
    vocab_size=154880,
    hidden_size=2048,
    num_hidden_layers=8,
    first_k_dense_replace=1,
    intermediate_size=4096,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=768,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=256,
    moe_intermediate_size=512,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    index_topk=2048,
    index_head_dim=128,
    index_n_heads=16,
    indexer_types=["full"] * 8,  # transformers' default, as ANCHORS.md measured it
    max_position_embeddings=16384,
)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU rehearsal."""

    model: str  # "mini" (ANCHORS.md) or "tiny" (runtime/weights/tiny.py)
    prompt_len: int  # decode prompts
    decode_tokens: int  # new tokens per timed decode run
    prefill_len: int  # the long prefill prompt
    prefix_len: int  # HiCache: cached prefix tokens
    cycles: int  # timed repeats (median reported)
    hf_warmup: int  # warm-up runs per shape for transformers (compile: >= 2)
    offload_tokens: int  # kvscope offloaded decode tokens
    hf_offload_tokens: int  # transformers + accelerate decode tokens (slow: few)
    compile_backend: str  # torch.compile backend of the transformers peer
    kernel_iters: int
    page_size: int
    fp8_block: tuple[int, int]


GPU = Sizes("mini", 512, 64, 4096, 8192, 3, 2, 64, 4, "inductor", 20, 64, (128, 128))
REHEARSAL = Sizes("tiny", 16, 4, 48, 64, 1, 1, 4, 2, "eager", 1, 16, (8, 8))


class Recorder:
    """The section's figures, rewritten atomically to its part file after every put."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict = {"status": "running", "figures": {}}
        self._write()

    def put(self, key: str, value) -> None:
        self.data["figures"][key] = value
        self._write()
        print(f"  {key}: {json.dumps(clean(value))[:300]}", flush=True)

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        if error:
            self.data["error"] = error
        self._write()

    def _write(self) -> None:
        write_atomic(self.path, self.data)


def clean(x):
    """JSON-safe: non-finite floats as strings, tuples as lists, rounded floats."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else str(x)
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [clean(v) for v in x]
    return x


def write_atomic(path: Path, data) -> None:
    """Write then rename: a reader (or a run cut off mid-write) sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(data), indent=1) + "\n")
    os.replace(tmp, path)


class Context:
    def __init__(self, run_dir: str | Path, rehearse: bool):
        self.run_dir = Path(run_dir)
        self.rehearse = rehearse
        self.sizes = REHEARSAL if rehearse else GPU
        self.device = torch.device("cpu" if rehearse else "cuda")
        self.dtype = torch.float32 if rehearse else torch.bfloat16

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def model_dir(self) -> Path:
        """The section's model, written once per run (a marker file says it is complete)."""
        from runtime.weights.tiny import write_tiny

        out = self.run_dir / self.sizes.model
        if (out / ".complete").exists():
            return out
        t0 = time.perf_counter()
        if self.rehearse:
            write_tiny(out, "glm_moe_dsa", seed=7)
        else:
            write_tiny(out, "glm_moe_dsa", seed=0, device="cuda", dtype=self.dtype, **MINI)
            torch.cuda.empty_cache()
        (out / ".complete").write_text("")
        print(f"  wrote the {self.sizes.model} checkpoint in {time.perf_counter() - t0:.1f}s")
        return out

    def engine_config(self, **kw):
        from runtime.engine import EngineConfig

        base = dict(
            device=self.device.type,
            dtype=self.dtype_name,
            page_size=self.sizes.page_size,
            max_running=8,
            cpu_graph="off",  # GPU: CUDA graphs; rehearsal: no background compile
        )
        return EngineConfig(**{**base, **kw})

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _prompts(ctx: Context, model: Path, length: int, seed: int):
    from app.bench_runners import Prompts
    from runtime.model_config import load_config

    return Prompts(seed, load_config(model).vocab_size, length)


# --- section 1 -------------------------------------------------------------------------------


def section_kernels(rec: Recorder, ctx: Context) -> None:
    """Every kernel vs its torch reference (GPU: layer sizes in bf16), then both tiny
    architectures through the kernel path vs the torch path (CUDA graphs and eager)."""
    from app import gpu_kernels

    ops = [k for k in gpu_kernels.CHECKS if k != "model"]
    rows: list[dict] = []

    def keep(r) -> None:
        rows.append(asdict(r))
        rec.data["figures"]["ops"] = rows
        rec._write()

    gpu_kernels.run_checks(ctx.device, ctx.sizes.kernel_iters, ops, ctx.rehearse, keep)
    rec.put("ops_ok", all(r["ok"] for r in rows) and len(rows) >= len(ops))
    from app.kernel_model_check import compare

    models = []
    dtypes = (torch.float32,) if ctx.rehearse else (torch.float32, torch.bfloat16)
    for arch in ("glm_moe_dsa", "glm4_moe"):
        for dt in dtypes:
            kw = dict(prompt_lens=(5, 3), steps=1) if ctx.rehearse else {}
            r = compare(arch, dt, ctx.device, **kw)
            models.append(asdict(r))
            rec.put("models", models)
    rec.put("models_ok", all(m["ok"] and m["token_mismatches"] == 0 for m in models))


# --- section 2 -------------------------------------------------------------------------------


def section_mini(rec: Recorder, ctx: Context) -> None:
    """kvscope vs transformers static cache + torch.compile on "mini": decode at batch 1 and 8,
    prefill of a long prompt, weight bandwidth as a fraction of the measured copy bandwidth."""
    from app.bench_floors import bytes_per_step, copy_bandwidth
    from app.bench_runners import COMPILE_VARIANT, HFRunner, KvscopeRunner
    from runtime.model_config import load_config

    S = ctx.sizes
    model = ctx.model_dir()
    cfg = load_config(model)
    rec.put("model", {"arch": cfg.arch, "name": S.model, "dtype": ctx.dtype_name})
    bw = max(copy_bandwidth(ctx.device))
    rec.put("copy_bandwidth_GBps", bw / 1e9)
    dbytes = torch.empty((), dtype=ctx.dtype).element_size()
    short = _prompts(ctx, model, S.prompt_len, 1)
    long = _prompts(ctx, model, S.prefill_len, 2)
    n = S.decode_tokens

    def measure(runner, who: str, warm: int) -> dict:
        out: dict = {}
        for b in (1, 8):
            for i in range(warm):
                runner.run(short(100 * b + i, b), n)
            runs = [runner.run(short(1000 * b + i, b), n) for i in range(S.cycles)]
            rate = _median([r.decode_tok_s for r in runs])
            frac = bytes_per_step(cfg, b, dbytes) * rate / b / bw
            out[f"decode_b{b}_tok_s"] = rate
            out[f"weight_bw_fraction_b{b}"] = frac
            rec.put(who, out)
        for i in range(warm):
            runner.run(long(10 + i, 1), 1)
        runs = [runner.run(long(20 + i, 1), 1) for i in range(S.cycles)]
        out["prefill_tok_s"] = _median([r.prefill_tok_s for r in runs])
        out["prefill_len"] = S.prefill_len
        rec.put(who, out)
        return out

    kv = KvscopeRunner(model, ctx.engine_config(), 8, S.prompt_len)
    if kv.engine.config.max_batch_tokens < S.prefill_len:
        raise RuntimeError("the long prefill would be chunked; raise max_batch_tokens")
    ours = measure(kv, "kvscope", 1)
    kv.close()
    del kv
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    hf = HFRunner(model, cfg.arch, ctx.dtype, ctx.device, COMPILE_VARIANT, S.compile_backend)
    rec.put("transformers_variant", f"{COMPILE_VARIANT} (grouped_mm), backend {S.compile_backend}")
    peer = measure(hf, "transformers", S.hf_warmup)
    rec.put(
        "ratios",
        {
            "decode_b1": ours["decode_b1_tok_s"] / peer["decode_b1_tok_s"],
            "decode_b8": ours["decode_b8_tok_s"] / peer["decode_b8_tok_s"],
            "prefill": ours["prefill_tok_s"] / peer["prefill_tok_s"],
        },
    )


# --- section 3 -------------------------------------------------------------------------------


def section_hicache(rec: Recorder, ctx: Context) -> None:
    """TTFT of a prompt whose long prefix is cached in L2 (host) or L3 (disk) vs recomputing it,
    with the default integrity checks on (checksums verified on load-back)."""
    from app.bench_runners import KvscopeRunner

    S = ctx.sizes
    model = ctx.model_dir()
    tail = S.page_size // 2  # the tokens after the cached prefix (recomputed in every case)
    plen = S.prefix_len + tail
    l3 = tempfile.mkdtemp(prefix="kvscope-gpu-check-l3-")  # on disk: RUN_DIR may be /dev/shm
    conf = ctx.engine_config(
        max_running=1,
        kv_host_mem=(1 << 30) if not ctx.rehearse else (16 << 20),
        kv_disk=l3,
        write_policy="write_through",
    )
    try:
        _hicache_cycles(rec, ctx, KvscopeRunner(model, conf, 1, plen), model, plen)
    finally:
        shutil.rmtree(l3, ignore_errors=True)


def _hicache_cycles(rec: Recorder, ctx: Context, runner, model: Path, plen: int) -> None:
    from app.bench_cached import evict_tiers

    S = ctx.sizes
    prompts = _prompts(ctx, model, plen, 3)
    ttft: dict[str, list[float]] = {"recompute": [], "L2": [], "L3": []}
    served: dict[str, list[int]] = {"L2": [], "L3": []}
    for i in range(1 + S.cycles):  # cycle 0 warms every path
        p = prompts(i, 1)[0]
        cold = runner.run([p], 2)
        if any(cold.extra["cached_tokens"].values()):
            raise RuntimeError(f"the cold run hit the cache: {cold.extra}")
        times = {"recompute": cold.prefill_s}
        for tier, evict in (("L2", ("L1",)), ("L3", ("L1", "L2"))):
            evict_tiers(runner, evict)
            r = runner.run([p], 2)
            got = r.extra["cached_tokens"]
            if got.get(tier, 0) < S.prefix_len or got.get("L1"):
                raise RuntimeError(f"{tier} run was not served from {tier}: {got}")
            times[tier] = r.prefill_s
            served[tier].append(got[tier])
        if i:
            for k, v in times.items():
                ttft[k].append(v)
            med = {k: _median(v) for k, v in ttft.items()}
            rec.put("ttft_s", med)
            rec.put("prefix_tokens", S.prefix_len)
            rec.put("served_tokens", served)
            rec.put(
                "speedup",
                {t: med["recompute"] / med[t] for t in ("L2", "L3")},
            )
    events = runner.engine.snapshot().integrity_events  # every request also finished cleanly
    rec.put("integrity", {"protections": True, "integrity_events": len(events)})
    runner.close()


# --- section 4 -------------------------------------------------------------------------------


def section_integrity(rec: Recorder, ctx: Context) -> None:
    """Decode tok/s with the default integrity checks vs checks off, interleaved in one run."""
    from app.bench_runners import KvscopeRunner
    from runtime.integrity.config import IntegrityConfig

    S = ctx.sizes
    model = ctx.model_dir()
    on_conf = ctx.engine_config()
    off_conf = replace(
        on_conf,
        unsafe=True,
        integrity=IntegrityConfig(protections=False, checksum_sample=0.0, shadow_rate=0.0),
    )
    runners = {
        "checks_on": KvscopeRunner(model, on_conf, 8, S.prompt_len),
        "checks_off": KvscopeRunner(model, off_conf, 8, S.prompt_len),
    }
    prompts = _prompts(ctx, model, S.prompt_len, 4)
    n = S.decode_tokens
    for b in (1, 8):
        for r in runners.values():
            r.run(prompts(b, b), n)
    rates: dict[str, dict[str, list[float]]] = {k: {"b1": [], "b8": []} for k in runners}
    for i in range(S.cycles):
        for b in (1, 8):
            batch = prompts(100 + 10 * i + b, b)
            order = list(runners) if i % 2 == 0 else list(runners)[::-1]
            for k in order:
                rates[k][f"b{b}"].append(runners[k].run(batch, n).decode_tok_s)
        med = {k: {s: _median(v) for s, v in by.items()} for k, by in rates.items()}
        rec.put("decode_tok_s", med)
        over = {s: med["checks_off"][s] / med["checks_on"][s] - 1 for s in ("b1", "b8")}
        rec.put("overhead", {**over, "worst": max(over.values())})
    for r in runners.values():
        r.close()


# --- section 5 -------------------------------------------------------------------------------


def section_offload(rec: Recorder, ctx: Context) -> None:
    """Routed experts in host memory (pinned on CUDA) behind a GPU expert cache of 25 % of them,
    batch-1 decode; transformers + accelerate offload on the same model; int4 / nf4 / FP8."""
    from app.bench_runners import KvscopeRunner

    S = ctx.sizes
    model = ctx.model_dir()
    prompts = _prompts(ctx, model, S.prompt_len, 5)
    if ctx.device.type == "cuda":
        from app.bench_floors import h2d_bandwidth

        rec.put("h2d_pinned_GBps", max(h2d_bandwidth(ctx.device, True)) / 1e9)
    results: dict = {}
    errors: list[str] = []

    def attempt(label: str, fn, *a) -> None:
        """One variant; a failure is recorded and the others still run."""
        try:
            fn(label, *a)
        except Exception as exc:  # noqa: BLE001 - reported in the figures and the status
            traceback.print_exc()
            errors.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
            rec.put("errors", errors)

    def kvscope(label: str, mdir: Path, quant: str) -> None:
        conf = ctx.engine_config(max_running=1, expert_cache="25%", quant=quant)
        r = KvscopeRunner(mdir, conf, 1, S.prompt_len)
        r.run(prompts(0, 1), S.offload_tokens)  # warm: compiles, fills the cache
        cache = r.expert_cache
        before = cache.stats() if cache is not None else None
        res = r.run(prompts(1, 1), S.offload_tokens)
        out = {"decode_tok_s": res.decode_tok_s, "quant": quant, "expert_cache": "25%"}
        if cache is not None:
            after = cache.stats()
            steps = max(S.offload_tokens, 1)
            out.update(
                tier=after.tier,
                capacity=after.capacity,
                hit_rate=res.extra.get("expert_hit_rate"),
                bytes_per_token=(after.bytes_transferred - before.bytes_transferred) / steps,
            )
        r.close()
        results[label] = out
        rec.put("kvscope", results)

    def peer(label: str) -> None:
        rec.put(label, _hf_offload(ctx, model, prompts(1, 1)[0]))

    def fp8(label: str) -> None:
        from runtime.weights.fp8 import write_fp8_checkpoint

        fp8_dir = ctx.run_dir / f"{S.model}-fp8"
        if not (fp8_dir / ".complete").exists():
            write_fp8_checkpoint(model, fp8_dir, S.fp8_block, device=ctx.device)
            (fp8_dir / ".complete").write_text("")
        kvscope(label, fp8_dir, "none")

    attempt("unquantized", kvscope, model, "none")
    attempt("transformers_accelerate", peer)
    attempt("int4", kvscope, model, "int4")
    attempt("nf4", kvscope, model, "nf4")
    attempt("fp8", fp8)
    if errors:
        raise RuntimeError("; ".join(errors))


def _hf_offload(ctx: Context, model: Path, prompt: list[int]) -> dict:
    """transformers with accelerate's dispatch_model: embeddings, head and layer 0 on the main
    device, layers 1.. in host memory (as ANCHORS.md measured it: 0.59 tok/s on an H200)."""
    from accelerate import dispatch_model

    from app.bench_runners import HFRunner
    from runtime.model_config import load_config

    cfg = load_config(model)
    hf = HFRunner(model, cfg.arch, ctx.dtype, "cpu", "grouped_mm")
    main = 0 if ctx.device.type == "cuda" else "cpu"
    dm = {"model.embed_tokens": main, "model.norm": main, "lm_head": main}
    dm["model.rotary_emb"] = main
    for i in range(cfg.num_layers):
        dm[f"model.layers.{i}"] = main if i == 0 else "cpu"
    hf.model = dispatch_model(hf.model, device_map=dm, main_device=main)
    hf.device = ctx.device
    n = ctx.sizes.hf_offload_tokens
    hf.run([prompt], 2)  # warm
    res = hf.run([prompt], n)
    return {"decode_tok_s": res.decode_tok_s, "layers_offloaded": cfg.num_layers - 1}


RUN: dict[str, Callable[[Recorder, Context], None]] = {
    "kernels": section_kernels,
    "mini": section_mini,
    "hicache": section_hicache,
    "integrity": section_integrity,
    "offload": section_offload,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rehearse = "--rehearse" in argv
    name, run_dir, part = [a for a in argv if a != "--rehearse"][:3]
    rec = Recorder(part)
    ctx = Context(run_dir, rehearse)
    if ctx.device.type == "cuda":
        rec.put("device", torch.cuda.get_device_name())
    else:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        rec.put("device", "cpu (rehearsal)")
    try:
        RUN[name](rec, ctx)
    except Exception as exc:  # the runner records it and goes on with the next section
        traceback.print_exc()
        rec.finish("failed", f"{type(exc).__name__}: {str(exc)[:500]}")
        return 1
    rec.finish("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
