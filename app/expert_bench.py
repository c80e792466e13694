"""GPU timing of expert offload and of the int4 MoE kernel (CUDA only; also used by gpu-check).

    kvscope expert-bench --model DIR --expert-cache 25% --json out.json

`bench_offload_decode` measures batch-1 decode with routed experts in pinned host memory behind a
GPU expert cache, the pinned host->device bandwidth on the same machine, and the PCIe floor that
the measured miss traffic implies (tok/s if every decode step only paid for its expert copies).
The issue's target: >= 60 tok/s on "mini" with a 25 % cache, within 2x of that floor.
`bench_int4_moe` times the w4a16 kernel against the bf16 fused_moe kernel on one layer's shapes.
Every shape is warmed up before it is timed.
"""

from __future__ import annotations

import json
import time

import torch

from kernels.backend import cuda_time_per_call


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        from runtime.errors import KvscopeError

        raise KvscopeError("expert-bench: needs a CUDA device (none is available here)")


def h2d_bandwidth(nbytes: int = 256 * 2**20, pinned: bool = True, repeats: int = 5) -> float:
    """Host -> device copy bandwidth in bytes/s (best of ``repeats``)."""
    _need_cuda()
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def bench_offload_decode(
    model_dir: str,
    expert_cache: str | None = "25%",
    quant: str = "none",
    dtype: str = "bfloat16",
    prompt_len: int = 512,
    new_tokens: int = 128,
    warmup_tokens: int = 16,
    policy: str = "lru",
    prefetch: bool = True,
    cpu_compute: bool = False,
    seed: int = 0,
) -> dict:
    """Batch-1 decode tok/s with offloaded experts (``expert_cache=None``: all resident)."""
    _need_cuda()
    from runtime.engine import Engine, EngineConfig

    cfg = EngineConfig(
        device="cuda",
        dtype=dtype,
        quant=quant,
        expert_cache=expert_cache,
        expert_policy=policy,
        expert_prefetch=prefetch,
        expert_cpu_compute=cpu_compute,
        max_running=1,
    )
    t0 = time.perf_counter()
    eng = Engine(model_dir, cfg)
    load_s = time.perf_counter() - t0
    v = eng.model_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, v, (prompt_len,), generator=g).tolist()
    eng.generate(prompt[: max(8, prompt_len // 4)], max_new_tokens=warmup_tokens, ignore_eos=True)
    rid = eng.submit(prompt_ids=prompt, max_new_tokens=new_tokens + 1, ignore_eos=True)
    req = eng.request(rid)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while not req.output_ids:  # prefill (chunked) up to the first token
        eng.step()
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    before = eng.weight_plan.stats()
    t0 = time.perf_counter()
    while not req.done:
        eng.step()
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - t0
    after = eng.weight_plan.stats()
    n = len(req.output_ids) - 1
    out = {
        "model": str(model_dir),
        "device": torch.cuda.get_device_name(),
        "dtype": dtype,
        "quant": quant,
        "expert_cache": expert_cache,
        "policy": policy,
        "prefetch": prefetch,
        "load_s": round(load_s, 2),
        "prefill_s": round(prefill_s, 4),
        "decode_tokens": n,
        "decode_tok_s": round(n / decode_s, 2),
    }
    if after is not None:
        bw = h2d_bandwidth()
        hits = after.total_hits - before.total_hits
        misses = after.total_misses - before.total_misses
        moved = after.bytes_transferred - before.bytes_transferred
        per_tok = moved / max(n, 1)
        floor = bw / per_tok if per_tok else float("inf")
        out.update(
            capacity=after.capacity,
            hit_rate=round(hits / max(hits + misses, 1), 4),
            misses_per_token=round(misses / max(n, 1), 3),
            bytes_per_token=int(per_tok),
            h2d_pinned_GBps=round(bw / 1e9, 2),
            pcie_floor_tok_s=round(floor, 2),
            floor_over_measured=round(floor / (n / decode_s), 3),
            prefetch_accuracy=round(after.prefetch_accuracy, 4),
            prefetch_recall=round(after.prefetch_recall, 4),
            prefetch_useful=after.prefetch_useful - before.prefetch_useful,
            streamed=after.streamed - before.streamed,
        )
    return out


def bench_int4_moe(
    T: int = 1, E: int = 256, D: int = 2048, I: int = 512, k: int = 8, iters: int = 50
) -> dict:
    """Seconds per call of int4_moe vs bf16 fused_moe on one layer, and the weight bytes each
    reads for the experts the tokens hit."""
    _need_cuda()
    from kernels.fused_moe import fused_moe
    from kernels.int4_moe import int4_moe, quantize_int4

    g = torch.Generator(device="cuda").manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(T, D, device=dev, generator=g).to(bf)
    wgu = (torch.randn(E, 2 * I, D, device=dev, generator=g) * D**-0.5).to(bf)
    wd = (torch.randn(E, D, I, device=dev, generator=g) * I**-0.5).to(bf)
    ids = torch.stack([torch.randperm(E, device=dev, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, device=dev, generator=g)
    gu4, dn4 = quantize_int4(wgu), quantize_int4(wd)
    t4 = cuda_time_per_call(lambda: int4_moe(x, gu4, dn4, ids, w), iters)
    t16 = cuda_time_per_call(lambda: fused_moe(x, wgu, wd, ids, w), iters)
    active = int(torch.unique(ids).numel())
    b16 = active * 3 * I * D * 2
    b4 = active * (gu4.nbytes + dn4.nbytes) // E
    return {
        "shape": dict(T=T, E=E, D=D, I=I, k=k),
        "int4_us": round(t4 * 1e6, 1),
        "bf16_us": round(t16 * 1e6, 1),
        "int4_GBps": round(b4 / t4 / 1e9, 1),
        "bf16_GBps": round(b16 / t16 / 1e9, 1),
    }


def add_expert_bench_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    p.add_argument("--expert-cache", default="25%", help="N experts, P%% of them, or SIZE")
    p.add_argument("--quant", default="none", choices=["none", "nf4", "int8", "int4"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--json", metavar="FILE", help="also write the results here")


def cmd_expert_bench(args) -> int:
    """`kvscope expert-bench`: offloaded vs resident decode and the int4 kernel, as JSON."""
    from pathlib import Path

    from runtime.errors import KvscopeError
    from runtime.weights.placement import parse_expert_cache

    if not Path(args.model).is_dir():
        raise KvscopeError(f"--model {args.model}: not a directory")
    parse_expert_cache(args.expert_cache)  # one-line error on a bad value
    if args.prompt_len < 8 or args.new_tokens < 1:
        raise KvscopeError("--prompt-len must be >= 8 and --new-tokens >= 1")
    _need_cuda()
    res = {
        "offload": bench_offload_decode(
            args.model, args.expert_cache, args.quant, args.dtype, args.prompt_len, args.new_tokens
        ),
        "resident": None,
        "int4_moe": [bench_int4_moe(T) for T in (1, 8, 64)],
    }
    try:  # all experts on the GPU, when they fit
        res["resident"] = bench_offload_decode(
            args.model, None, args.quant, args.dtype, args.prompt_len, args.new_tokens
        )
    except Exception as e:  # noqa: BLE001 - report, do not fail the offload numbers
        res["resident"] = {"error": str(e)}
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
