"""Section 1 of `kvscope gpu-check`: every Triton kernel against its torch reference, timed.

Inputs are fresh random tensors at GLM-5 / GLM-4.5 layer sizes (bf16; experts cut to 32 to keep
the reference quick). The last check, "model", runs the whole model on tiny checkpoints of both
architectures through the kernels (decode steps from CUDA graphs, then eagerly) against the torch
path on CPU (app/kernel_model_check.py). `run_checks(..., smoke=True)` runs tiny sizes on any
device (on CPU through the interpreter; timings meaningless): the rehearsal (`--rehearse`).
`compile_check(CC)` (`kvscope gpu-check --compile 90`) compiles every kernel as the wrappers
launch it at GPU sizes for sm_CC down to a cubin (Triton ships ptxas), without a GPU: it catches
what the interpreter does not check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SMOKE = False  # tiny sizes, any device (a CPU run goes through the interpreter); see run_checks


def _n(full: int, small: int) -> int:
    return small if SMOKE else full


@dataclass
class Result:
    op: str
    shape: str
    max_abs_err: float
    tol: float
    ok: bool
    triton_us: float
    torch_us: float


def _time_us(fn: Callable[[], object], iters: int) -> float:
    if not torch.cuda.is_available() or SMOKE:  # --smoke on CPU: run once, time nothing useful
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    from kernels.backend import cuda_time_per_call

    return cuda_time_per_call(fn, iters) * 1e6


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "inf/nan pattern differs"
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def _paged(
    rows: int, page_size: int, width: tuple[int, ...], batch: int, dev, dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shuffled page pool holding `batch` sequences of `rows` tokens each."""
    pages = -(-rows // page_size)
    slots = batch * pages + 8
    plane = torch.randn(slots, page_size, *width, device=dev).to(dtype)
    pt = torch.randperm(slots, device=dev)[: batch * pages].view(batch, pages).to(torch.int32)
    lens = torch.full((batch,), rows, dtype=torch.int32, device=dev)
    return plane, pt, lens


def check_rmsnorm(dev, iters):
    from kernels.rmsnorm import reference_rmsnorm, rmsnorm

    x = torch.randn(_n(256, 3), _n(6144, 40), device=dev).bfloat16()
    r = torch.randn_like(x)
    w = torch.randn(x.shape[1], device=dev).bfloat16()
    out, ref = rmsnorm(x, w, 1e-5, r)[0], reference_rmsnorm(x, w, 1e-5, r)[0]
    t = _time_us(lambda: rmsnorm(x, w, 1e-5, r), iters)
    tr = _time_us(lambda: reference_rmsnorm(x, w, 1e-5, r), iters)
    rel = _err(out, ref) / float(ref.float().abs().max())
    return f"T={x.shape[0]} D={x.shape[1]} +res", rel, 1e-2, t, tr


def _rope_tables(t: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 cos / sin [t, 64] in transformers' layout (cat(freqs, freqs))."""
    ang = torch.rand(t, 32, device=dev) * 100
    both = torch.cat([ang, ang], -1)
    return both.cos().bfloat16(), both.sin().bfloat16()


def check_rope(dev, iters):
    from kernels.rope import reference_rope_interleave, rope_interleave

    x = torch.randn(_n(256, 3), _n(64, 3), 64, device=dev).bfloat16()
    cos, sin = _rope_tables(x.shape[0], dev)
    out = rope_interleave(x, cos, sin)
    ref = reference_rope_interleave(x.float(), cos.float(), sin.float())
    t = _time_us(lambda: rope_interleave(x, cos, sin), iters)
    tr = _time_us(lambda: reference_rope_interleave(x, cos, sin), iters)
    return f"T={x.shape[0]} H={x.shape[1]} R=64 interleave", _err(out, ref), 3e-2, t, tr


def check_rope_neox(dev, iters):
    from kernels.rope import reference_rope_neox, rope_neox

    x = torch.randn(_n(256, 3), _n(96, 3), 128, device=dev).bfloat16()
    cos, sin = _rope_tables(x.shape[0], dev)
    out = rope_neox(x, cos, sin)
    ref = reference_rope_neox(x.float(), cos.float(), sin.float())
    t = _time_us(lambda: rope_neox(x, cos, sin), iters)
    tr = _time_us(lambda: reference_rope_neox(x, cos, sin), iters)
    return f"T={x.shape[0]} H={x.shape[1]} D=128 R=64 neox", _err(out, ref), 3e-2, t, tr


def check_page_store(dev, iters):
    from kernels.page_store import page_store, reference_page_store

    S, T = _n(4096, 8), _n(512, 5)
    plane = torch.zeros(S, 64, 576, device=dev).bfloat16()
    plane_ref = plane.clone()
    flat = torch.randperm(S * 64, device=dev)[:T]
    vals = torch.randn(T, 576, device=dev).bfloat16()
    page_store(plane, flat, vals)
    reference_page_store(plane_ref, flat, vals)
    err = 0.0 if torch.equal(plane, plane_ref) else float("inf")
    t = _time_us(lambda: page_store(plane, flat, vals), iters)
    tr = _time_us(lambda: reference_page_store(plane_ref, flat, vals), iters)
    return f"T={T} W=576", err, 0.0, t, tr


def check_page_copy(dev, iters):
    from kernels.page_copy import page_gather, page_scatter, reference_page_gather

    S = _n(4096, 8)
    plane = torch.randn(S, 64, 576, device=dev).bfloat16()
    ids = torch.randperm(S, device=dev)[: _n(256, 3)]
    buf = page_gather(plane, ids)
    err = 0.0 if torch.equal(buf, reference_page_gather(plane, ids)) else float("inf")
    page_scatter(plane, ids.flip(0), buf)
    err = err if torch.equal(plane[ids.flip(0)], buf) else float("inf")
    t = _time_us(lambda: page_gather(plane, ids, out=buf), iters)
    tr = _time_us(lambda: torch.index_select(plane, 0, ids, out=buf), iters)
    return f"{len(ids)} pages x 64 x 576", err, 0.0, t, tr


def check_page_checksum(dev, iters):
    from kernels.page_checksum import page_checksum, reference_page_checksum

    S = _n(1024, 4)
    plane = torch.randn(S, 64, 576, device=dev).bfloat16()
    ids = torch.arange(S, device=dev)
    d, ref = page_checksum(plane, ids), reference_page_checksum(plane, ids)
    cpu = page_checksum(plane[:2].cpu())  # same digests on the CPU (interpreter) path
    err = 0.0 if torch.equal(d, ref) and torch.equal(cpu, d[:2].cpu()) else float("inf")
    t = _time_us(lambda: page_checksum(plane, ids), iters)
    tr = _time_us(lambda: reference_page_checksum(plane, ids), max(iters // 10, 1))
    return f"{S} pages x 64 x 576", err, 0.0, t, tr


def check_dsa_indexer(dev, iters):
    from kernels.dsa_indexer import dsa_indexer_scores, reference_dsa_indexer_scores

    S, B = _n(16384, 70), _n(4, 2)
    plane, pt, lens = _paged(S, 64, (128,), B, dev, torch.bfloat16)
    q = torch.randn(B, 32, 128, device=dev).bfloat16()
    w = torch.randn(B, 32, device=dev) * 32**-0.5
    seq = torch.arange(B, dtype=torch.int32, device=dev)
    kw = dict(scale=128**-0.5, max_len=S)
    args = (q, w, plane, pt, seq, lens)
    out, ref = dsa_indexer_scores(*args, **kw), reference_dsa_indexer_scores(*args, **kw)
    t = _time_us(lambda: dsa_indexer_scores(*args, **kw), iters)
    tr = _time_us(lambda: reference_dsa_indexer_scores(*args, **kw), iters)
    return f"B={B} S={S} Hi=32 Di=128", _err(out, ref) / float(ref.abs().max()), 1e-3, t, tr


def check_mla_decode(dev, iters):
    from kernels.mla_decode import mla_decode, reference_mla_decode

    B, S, K, H = _n(8, 2), _n(8192, 70), _n(2048, 40), _n(64, 3)
    plane, pt, lens = _paged(S, 64, (_n(512, 48) + 64,), B, dev, torch.bfloat16)
    q_nope = torch.randn(B, H, 192, device=dev).bfloat16()
    q_rope = torch.randn(B, H, 64, device=dev).bfloat16()
    L = plane.shape[-1] - 64
    w_uk = (torch.randn(H, 192, L, device=dev) * 192**-0.5).bfloat16()
    w_uv = (torch.randn(H, 256, L, device=dev) * L**-0.5).bfloat16()
    topk = torch.stack([torch.randperm(S, device=dev)[:K] for _ in range(B)]).to(torch.int32)
    args = (q_nope, q_rope, plane, pt, topk, w_uk, w_uv)
    kw = dict(scale=256**-0.5)
    out, ref = mla_decode(*args, **kw), reference_mla_decode(*args, **kw)
    t = _time_us(lambda: mla_decode(*args, **kw), iters)
    tr = _time_us(lambda: reference_mla_decode(*args, **kw), iters)
    return f"B={B} H={H} K={K} L={L} R=64", _err(out, ref), 3e-2, t, tr


def check_gqa_decode(dev, iters):
    from kernels.gqa_decode import gqa_decode, reference_gqa_decode

    B, S = _n(8, 2), _n(4096, 70)
    kc, pt, lens = _paged(S, 64, (_n(8, 2), 128), B, dev, torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(B, _n(96, 6), 128, device=dev).bfloat16()
    args = (q, kc, vc, pt, lens)
    kw = dict(scale=128**-0.5)
    out, ref = gqa_decode(*args, **kw), reference_gqa_decode(*args, **kw)
    t = _time_us(lambda: gqa_decode(*args, **kw), iters)
    tr = _time_us(lambda: reference_gqa_decode(*args, **kw), iters)
    return f"B={B} S={S} Hq={q.shape[1]} Hkv={kc.shape[2]} D=128", _err(out, ref), 3e-2, t, tr


def check_fused_moe(dev, iters):
    from kernels.fused_moe import fused_moe, reference_fused_moe

    out_rows = []
    for T in (_n(4, 1), _n(512, 5)):
        E, k, D, I = _n(32, 6), _n(8, 2), _n(6144, 40), _n(2048, 24)
        x = torch.randn(T, D, device=dev).bfloat16()
        wgu = (torch.randn(E, 2 * I, D, device=dev) * D**-0.5).bfloat16()
        wd = (torch.randn(E, D, I, device=dev) * I**-0.5).bfloat16()
        ids = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)])
        w = torch.rand(T, k, device=dev)
        out = fused_moe(x, wgu, wd, ids, w)
        ref = reference_fused_moe(x.float(), wgu.float(), wd.float(), ids, w)
        t = _time_us(lambda: fused_moe(x, wgu, wd, ids, w), iters)  # noqa: B023
        tr = _time_us(lambda: reference_fused_moe(x, wgu, wd, ids, w), iters)  # noqa: B023
        rel = _err(out, ref) / float(ref.abs().max())
        out_rows.append((f"T={T} E={E} k={k} D={D} I={I}", rel, 2e-2, t, tr))
    return out_rows


def check_model(dev, iters):
    """The whole model, kernel path vs torch path (app/kernel_model_check.py), on tiny
    checkpoints of both architectures in fp32 and bf16: batched prefill over scattered pages,
    then decode steps (on CUDA replayed from CUDA graphs, and again eagerly). The error column is
    max |logit diff|; timings are a decode step with graphs (triton) and without (torch column)."""
    from app.kernel_model_check import compare

    rows = []
    for arch in ("glm_moe_dsa", "glm4_moe"):
        for dtype in (torch.float32, torch.bfloat16):
            if SMOKE:
                r = compare(arch, dtype, dev, prompt_lens=(18, 4), steps=1)
            else:
                r = compare(arch, dtype, dev)
            err = r.max_err if r.ok else float("inf")  # a token mismatch / no graph fails too
            shape = (
                f"{arch} {r.dtype}: tokens off {r.token_mismatches}, graphs {r.graphs}, "
                f"graph vs eager {r.graph_vs_eager_err:.1e}, raw err {r.max_err:.1e}"
            )
            rows.append((shape, err, r.tol, 1000 * r.decode_ms_graph, 1000 * r.decode_ms_eager))
    return rows


CHECKS: dict[str, Callable] = {
    "rmsnorm": check_rmsnorm,
    "rope_interleave": check_rope,
    "rope_neox": check_rope_neox,
    "page_store": check_page_store,
    "page_copy": check_page_copy,
    "page_checksum": check_page_checksum,
    "dsa_indexer": check_dsa_indexer,
    "mla_decode": check_mla_decode,
    "gqa_decode": check_gqa_decode,
    "fused_moe": check_fused_moe,
    "model": check_model,
}


def _meta_launches() -> dict[str, Callable[[], object]]:
    """Every wrapper at GPU sizes on "meta" tensors (bf16, plus fp32 where dots take the exact
    "ieee" path): under backend.compile_only each launch compiles instead of running."""
    from kernels import (
        attn_combine,
        dsa_indexer,
        fused_moe,
        gqa_decode,
        mla_decode,
        page_checksum,
        page_copy,
        page_store,
        rmsnorm,
        rope,
    )

    m = torch.device("meta")
    bf, f32, i32, i64 = torch.bfloat16, torch.float32, torch.int32, torch.int64

    def t(*shape, dtype=bf):
        return torch.empty(shape, dtype=dtype, device=m)

    def attention(dt):
        mla_decode.mla_decode(
            t(8, 64, 192, dtype=dt), t(8, 64, 64, dtype=dt), t(1000, 64, 576, dtype=dt),
            t(8, 128, dtype=i32), t(8, 2048, dtype=i32), t(64, 192, 512, dtype=dt),
            t(64, 256, 512, dtype=dt), scale=0.1, row_limit=t(8, dtype=i32),
        )  # fmt: skip
        mla_decode.mla_decode(  # as the model path calls it: prefill rows with their sequence
            t(8, 64, 192, dtype=dt), t(8, 64, 64, dtype=dt), t(1000, 64, 576, dtype=dt),
            t(2, 128, dtype=i32), t(8, 2048, dtype=i32), t(64, 192, 512, dtype=dt),
            t(64, 256, 512, dtype=dt), scale=0.1, row_seq=t(8, dtype=i32),
            row_limit=t(8, dtype=i32),
        )  # fmt: skip
        gqa_decode.gqa_decode(
            t(8, 96, 128, dtype=dt), t(1000, 64, 8, 128, dtype=dt), t(1000, 64, 8, 128, dtype=dt),
            t(8, 64, dtype=i32), t(8, dtype=i32), scale=0.1, row_seq=t(8, dtype=i32),
        )  # fmt: skip
        dsa_indexer.dsa_indexer_topk(
            t(4, 32, 128, dtype=dt), t(4, 32, dtype=f32), t(1000, 64, 128, dtype=dt),
            t(2, 256, dtype=i32), t(4, dtype=i32), t(4, dtype=i32), scale=0.1, topk=2048,
            max_len=16384,
        )  # fmt: skip

    return {
        "rmsnorm": lambda: (
            rmsnorm.rmsnorm(t(4, 6144), t(6144)),
            rmsnorm.rmsnorm(t(4, 6144), t(6144, dtype=f32), residual=t(4, 6144)),
        ),
        "rope": lambda: (
            rope.rope_interleave(t(4, 64, 64), t(4, 64), t(4, 64)),
            rope.rope_neox(t(4, 96, 128), t(100, 64), t(100, 64), positions=t(4, dtype=i64)),
        ),
        "page_store": lambda: (
            page_store.page_store(t(100, 64, 576), t(4, dtype=i64), t(4, 64), col_offset=512),
            page_store.page_store(t(100, 64, 8, 128), t(4, dtype=i64), t(4, 8, 128, dtype=f32)),
        ),
        "page_copy": lambda: page_copy.page_scatter(
            t(100, 64, 576), [1, 2], page_copy.page_gather(t(100, 64, 576), [3, 4])
        ),  # fmt: skip
        "page_checksum": lambda: page_checksum.page_checksum(t(100, 64, 576), [1, 2]),
        "attn_combine": lambda: attn_combine.attn_combine(
            t(8, 64, 16, 512, dtype=f32), t(8, 64, 16, dtype=f32), t(8, 64, 16, dtype=f32), bf
        ),
        "attention bf16": lambda: attention(bf),
        "attention fp32": lambda: attention(f32),
        "fused_moe": lambda: [
            fused_moe.fused_moe(
                t(T, 6144),
                t(256, 4096, 6144),
                t(256, 6144, 2048),
                t(T, 8, dtype=i64),
                t(T, 8, dtype=f32),
            )  # fmt: skip
            for T in (4, 4096)  # decode (BLOCK_M 16) and prefill (BLOCK_M 64)
        ],
    }


def compile_check(cc: int, only: list[str] | None = None) -> int:
    """Compile every kernel, as the wrappers launch it at GPU sizes, for sm_<cc>; no GPU needed.
    ``only`` picks groups by their leading word (``attention`` = mla + gqa + dsa)."""
    from triton.backends.compiler import GPUTarget

    from kernels import backend

    bad = 0
    for name, fn in _meta_launches().items():
        if only and name.split()[0] not in only and name not in only:
            continue
        t0 = time.perf_counter()
        with backend.compile_only(GPUTarget("cuda", cc, 32)) as done:
            try:
                fn()
                print(f"{name:16s} ok   ({time.perf_counter() - t0:.1f}s) {', '.join(done)}")
            except Exception as exc:
                bad += 1
                print(f"{name:16s} FAIL {type(exc).__name__}: {str(exc)[:2000]}")
    print("all compiled" if not bad else f"{bad} FAILED")
    return 0 if not bad else 1


def run_checks(
    dev: torch.device,
    iters: int = 20,
    only: list[str] | None = None,
    smoke: bool = False,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run the checks in CHECKS order (``only``: a subset); an op that raises is a failed row and
    the others still run. ``on_result`` sees every row as soon as it is measured."""
    global SMOKE
    SMOKE = smoke
    unknown = sorted(set(only or []) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown ops {unknown}; known: {', '.join(CHECKS)}")
    torch.manual_seed(0)
    results: list[Result] = []
    for name in only or CHECKS:
        t0 = time.perf_counter()
        try:
            rows = CHECKS[name](dev, iters)
        except Exception as exc:  # report and go on with the other ops
            print(f"{name:16s} ERROR {type(exc).__name__}: {exc}", flush=True)
            rows = [(f"error: {type(exc).__name__}: {str(exc)[:300]}", float("inf"), 0.0, 0, 0)]
        for shape, err, tol, t, tr in rows if isinstance(rows, list) else [rows]:
            r = Result(name, shape, err, tol, err <= tol, t, tr)
            results.append(r)
            print(
                f"{name:16s} {'ok  ' if r.ok else 'FAIL'} err {err:.2e} (tol {tol:.0e})  "
                f"triton {t:9.1f} us  torch {tr:9.1f} us  [{shape}] "
                f"({time.perf_counter() - t0:.1f}s)",
                flush=True,
            )
            if on_result is not None:
                on_result(r)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results
