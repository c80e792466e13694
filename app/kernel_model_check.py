"""Whole-model check: the kernel step (runtime/models/steps.py KernelStep) against the torch path.

`compare(arch, dtype, device)` writes a tiny checkpoint (runtime/weights/tiny.py), runs the torch
reference path on CPU with greedy decoding (a batched prefill of several sequences over scattered
pages, then decode steps), feeds the same tokens to the kernel path on ``device`` (CUDA: compiled
Triton kernels, decode steps replayed from CUDA graphs, then again eagerly with graphs off; CPU:
the Triton interpreter, forced with KVSCOPE_TRITON_INTERPRET=1) and compares logits at every step.
`kvscope gpu-check` runs it on CUDA (section "kernels", check "model", app/gpu_kernels.py);
tests/runtime/test_kernel_path.py is the CPU test. Steps run through a ModelRunner
(runtime/models/runner.py), which replays CUDA graphs on CUDA.

Tolerances (max |logit diff|, logits of magnitude ~5-10): fp32 1e-3, bf16 0.15 (bf16 rounding
inside the torch path; see the test's doc). Greedy tokens must agree at every row whose reference
top-1 margin exceeds twice the tolerance (closer rows may flip legitimately).

Discrete choices make bf16 logits incomparable once a near-tie flips: the DSA top-k (boundary
gaps of ~1e-2 against bf16 noise of ~1e-2 are common in tiny random models, and a flip moves
logits by ~1) and the MoE router's top-k. So bf16 runs on shorter, checked shapes, and GLM-5 in
bf16 gets ``index_topk`` >= every context (the indexer still runs under CUDA graphs, whose
max_len is larger, but selects every visible position); the sparse selection is held to the torch
path in fp32 here, and the indexer kernel in bf16 by its own check.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from runtime.kv.pool import KVPool, token_rows
from runtime.model_config import load_config
from runtime.models import build_model
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.models.runner import ModelRunner
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.tiny import write_tiny

# arch -> (write_tiny seed, prompt seed, config overrides)
TINY = {
    "glm_moe_dsa": (7, 1, {"num_hidden_layers": 3}),
    "glm4_moe": (6, 0, {}),
}
TOL = {torch.float32: 1e-3, torch.bfloat16: 0.15}
SHAPES = {  # dtype -> (prompt lengths, decode steps): 3 sequences (a padded graph bucket of 4)
    torch.float32: ((40, 4, 23), 8),
    torch.bfloat16: ((18, 4, 5), 4),
}
BF16_DSA = {"index_topk": 64}  # dense selection in bf16 (see the module doc)
PAGE = 16


@contextlib.contextmanager
def _dispatch(kernels_on_cpu: bool) -> Iterator[None]:
    """KVSCOPE_TRITON_INTERPRET set (CPU tensors take the kernels) or unset, then restored."""
    old = os.environ.get("KVSCOPE_TRITON_INTERPRET")
    if kernels_on_cpu:
        os.environ["KVSCOPE_TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("KVSCOPE_TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KVSCOPE_TRITON_INTERPRET", None)
        else:
            os.environ["KVSCOPE_TRITON_INTERPRET"] = old


def _batch(tokens, ends, first, pages, device) -> ForwardBatch:
    ids, pos, rows, seqs, off = [], [], [], [], 0
    for b, end in enumerate(ends):
        start = 0 if first else end - 1
        ctx = token_rows(pages[b], 0, end, PAGE)
        ids += tokens[b][start:end]
        pos += range(start, end)
        rows.append(ctx[start:end])
        seqs.append(SeqChunk(start, end, off, ctx.to(device)))
        off += end - start
    return ForwardBatch(
        torch.tensor(ids, device=device),
        torch.tensor(pos, device=device),
        torch.cat(rows).to(device),
        seqs,
    )


def _steps(
    model, cfg, dtype, device, tokens, prompt_lens, steps, pages, greedy, timings=None, graphs=True
):
    """Prefill then `steps` decode steps through a model runner (CUDA graphs on CUDA unless
    ``graphs`` is False); greedy appends the argmax to `tokens`. Returns (CPU fp32 logits
    [B, V] per step, the runner); `timings` (a list) gets the seconds of decode steps 2.."""
    slots = max(max(p) for p in pages) + 1
    pool = KVPool(cfg.num_layers, slots, PAGE, cfg.plane_widths(), dtype, device)
    runner = ModelRunner(model, pool, cpu_graph="off")
    if runner.cuda_graphs is not None and not graphs:
        runner.cuda_graphs.enabled = False
    out = []
    for step in range(steps + 1):
        ends = [n + step for n in prompt_lens]
        batch = _batch(tokens, ends, step == 0, pages, device)
        t0 = time.perf_counter()
        logits = runner.forward(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2 and timings is not None:  # step 1 may capture a graph
            timings.append(time.perf_counter() - t0)
        out.append(logits.float().cpu())
        if greedy and step < steps:
            for b, t in enumerate(tokens):
                t.append(int(out[-1][b].argmax()))
    return out, runner


@dataclass
class PathCheck:
    arch: str
    dtype: str
    device: str
    max_err: float  # max |logit diff| kernel path vs torch path, over all steps
    tol: float
    token_mismatches: int  # rows with reference margin > 2 * tol whose argmax differs
    graph_vs_eager_err: float  # CUDA: graph replay vs eager kernel path (0 elsewhere)
    graphs: int  # decode graphs captured (CUDA)
    decode_ms_graph: float  # CUDA: mean decode step with graphs
    decode_ms_eager: float  # mean decode step of the kernel path without graphs
    ok: bool


def compare(
    arch: str,
    dtype: torch.dtype,
    device: torch.device | str,
    prompt_lens: tuple[int, ...] | None = None,
    steps: int | None = None,
) -> PathCheck:
    """Kernel path on ``device`` vs torch path on CPU (see the module doc); shapes default to
    SHAPES[dtype]."""
    device = torch.device(device)
    prompt_lens = prompt_lens or SHAPES[dtype][0]
    steps = steps if steps is not None else SHAPES[dtype][1]
    seed, prompt_seed, overrides = TINY[arch]
    if arch == "glm_moe_dsa" and dtype != torch.float32:
        overrides = {**overrides, **BF16_DSA}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny(tmp, arch, seed=seed, **overrides)
        cfg = load_config(model_dir)
        ref_model = build_model(cfg, Checkpoint(model_dir), dtype, "cpu")
        dev_model = build_model(cfg, Checkpoint(model_dir), dtype, device)
    g = torch.Generator().manual_seed(prompt_seed)
    tokens = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in prompt_lens]
    perm = torch.randperm(sum(-(-(n + steps) // PAGE) for n in prompt_lens) + 3, generator=g)
    pages, used = [], 0
    for n in prompt_lens:
        k = -(-(n + steps) // PAGE)
        pages.append(perm[used : used + k].tolist())
        used += k
    with _dispatch(False):
        ref, _ = _steps(
            ref_model, cfg, dtype, torch.device("cpu"), tokens, prompt_lens, steps, pages, True
        )
    t_graph: list[float] = []
    t_eager: list[float] = []
    with _dispatch(device.type == "cpu"):
        ker, runner = _steps(
            dev_model, cfg, dtype, device, tokens, prompt_lens, steps, pages, False, t_graph
        )
        graphs = runner.cuda_graphs
        n_graphs = len(graphs.graphs) if graphs is not None else 0
        graph_err = 0.0
        if graphs is not None:  # CUDA: the same steps eagerly, graphs off
            eager, _ = _steps(
                dev_model,
                cfg,
                dtype,
                device,
                tokens,
                prompt_lens,
                steps,
                pages,
                False,
                t_eager,
                graphs=False,
            )
            graph_err = max(float((a - b).abs().max()) for a, b in zip(ker, eager, strict=True))
        else:
            t_eager = t_graph
            t_graph = []
    tol = TOL[dtype]
    err = max(float((a - b).abs().max()) for a, b in zip(ker, ref, strict=True))
    mismatches = 0
    for a, b in zip(ker, ref, strict=True):
        top2 = b.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
        mismatches += int(((a.argmax(-1) != b.argmax(-1)) & clear).sum())
    ok = err <= tol and mismatches == 0 and graph_err <= tol
    if device.type == "cuda":
        ok = ok and n_graphs > 0

    def ms(xs: list[float]) -> float:
        return 1000.0 * sum(xs) / len(xs) if xs else 0.0

    return PathCheck(
        arch,
        str(dtype).replace("torch.", ""),
        str(device),
        err,
        tol,
        mismatches,
        graph_err,
        n_graphs,
        ms(t_graph),
        ms(t_eager),
        ok,
    )
