"""The whole model through the Triton kernels (interpreted on CPU) vs the torch path.

``KVSCOPE_TRITON_INTERPRET=1`` sends CausalLM.forward through KernelStep (runtime/models/
steps.py: RMSNorm + residual, RoPE, page stores, DSA indexer top-k, absorbed sparse MLA /
paged GQA, fused MoE);
without it the same model object runs the torch reference path. Tiny configs of both
architectures, page_size 16, a batch of 2 sequences (one prompt longer than a page and than
index_topk, one shorter than index_topk, so sparse and full-causal rows share a step), scattered
page slots, a batched prefill and then decode steps. The torch path's greedy tokens are fed to
both; at every step the kernel path must pick the same argmax and its logits must match:

- fp32: max |logit diff| <= 1e-4 (the kernels run fp32 math on fp32 inputs; seen ~5e-6),
- bf16: max |logit diff| <= 0.15 with logits of magnitude ~5-8 (seen <= 0.11). bf16 keeps 8
  mantissa bits; the torch path rounds attention scores, softmax weights and RoPE products to
  bf16 where the kernels keep fp32, and the differences pass through every layer (for scale: the
  bf16 torch path is up to ~0.8 away from the same bf16 weights run in fp32, since near-ties in
  the DSA top-k flip). The argmax must still agree; the seeds are picked so that the torch
  path's top-1 margins exceed the tolerance at every step (checked).

Also: each before_read hook (layer, plane, seq) and the pool's read_guard (layer, plane, all
context rows) run exactly once per step, for every plane the step reads. In fp32 every decode
step also goes through DecodeGraphs (the CUDA-graph runner) with the capture replaced by an eager
rerun of the recorded step over the same static buffers (batch bucket 4: 2 padding rows), which
must give the eager kernel path's logits and KV writes; the warm-up/capture step must write no
KV. The CUDA capture itself is only exercised on a GPU (kvscope gpu-check, section "kernels").
Sizes are small because the interpreter runs each Triton program in Python.
"""

from __future__ import annotations

import copy
import os
from collections import Counter

import pytest
import torch

from kernels import backend
from runtime.kv.pool import KVPool, token_rows
from runtime.model_config import load_config
from runtime.models import build_model
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.models.cuda_graph import DecodeGraphs
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.tiny import write_tiny

if not torch.cuda.is_available():  # the interpreter must be on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

PAGE = 16
PROMPT_LENS = (18, 4)  # 18 > PAGE and > index_topk (6); 4 + DECODE_STEPS <= index_topk
DECODE_STEPS = 2
PAGES = [[9, 2, 6], [4, 11]]  # scattered slots; 20 positions need 2 pages, 6 need 1
TOL = {torch.float32: 1e-4, torch.bfloat16: 0.15}
# arch -> (write_tiny seed, prompt seed, config overrides); the seeds give top-1 margins of the
# torch path >= 0.3 at every step in both dtypes (tiny random models have close logits). Layers
# are cut to keep the interpreter quick; both keep a dense first layer and MoE after it.
ARCHS = {
    # 3 layers: full indexer, shared (reuses layer 0's selection), full
    "glm_moe_dsa": (7, 1, dict(num_hidden_layers=3)),
    # 2 layers: GQA 6/2 heads, partial RoPE, QK-norm, attention bias
    "glm4_moe": (5, 1, dict(num_hidden_layers=2)),
}


def _step_batch(tokens: list[list[int]], first: bool) -> ForwardBatch:
    ids, pos, rows, seqs, off = [], [], [], [], 0
    for b, toks in enumerate(tokens):
        end = len(toks)
        start = 0 if first else end - 1
        ctx = token_rows(PAGES[b], 0, end, PAGE)
        ids += toks[start:end]
        pos += range(start, end)
        rows.append(ctx[start:end])
        # sequence 0 passes its page list, sequence 1 lets the batch derive it from ctx_rows
        seqs.append(SeqChunk(start, end, off, ctx, pages=PAGES[b] if b == 0 else None))
        off += end - start
    return ForwardBatch(torch.tensor(ids), torch.tensor(pos), torch.cat(rows), seqs)


class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay() reruns the recorded step eagerly
    over the same static buffers (everything of DecodeGraphs but the capture itself)."""

    def __init__(self, g, step):
        self.g, self.step = g, step

    def replay(self) -> None:
        self.g.logits.copy_(self.step())


def _capture_on_cpu(self: DecodeGraphs, bb: int, width: int, pool: KVPool):
    g = self._buffers(bb, width, pool)
    step = self._step_fn(g, pool)
    before = {k: v.clone() for k, v in pool.planes.items()}
    g.logits = step()  # the null step that warm-up and capture run
    for k, v in pool.planes.items():
        assert torch.equal(before[k], v), f"the null step wrote the {k} plane"
    g.graph = _EagerGraph(g, step)
    return g


def _run_kernels(model, cfg, dtype, tokens, monkeypatch, graphs=None) -> dict:
    """Kernel path: prefill all prompts in one batch, then decode, feeding ``tokens`` (prompts +
    the torch path's choices). Returns per-step logits [B, V] ("logits"), each step's hook calls
    ("hooks") and the Triton launches per kernel module ("launched"). With ``graphs`` (a
    DecodeGraphs), each decode step also runs through it on a copy of the pool first
    ("graph_logits", "graph_hooks", and the copies' planes after the step, "graph_planes")."""
    monkeypatch.setenv("KVSCOPE_TRITON_INTERPRET", "1")
    launched = Counter()
    real_launch = backend.launch

    def counting_launch(kernel, grid, device, *args, **kwargs):
        launched[getattr(kernel, "fn", kernel).__module__] += 1
        return real_launch(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(backend, "launch", counting_launch)
    pool = KVPool(cfg.num_layers, 16, PAGE, cfg.plane_widths(), dtype)
    calls: list[tuple] = []  # this step's before_read hooks (layer, plane, seq) and read guards
    pool.read_guard = lambda layer, plane, rows: calls.append((layer, plane, "guard", len(rows)))
    out = {"logits": [], "hooks": [], "graph_logits": [], "graph_hooks": [], "graph_planes": []}
    for step in range(DECODE_STEPS + 1):
        n = [p + step for p in PROMPT_LENS]
        toks = [t[:k] for t, k in zip(tokens, n, strict=True)]
        if graphs is not None and step > 0:
            twin = copy.copy(pool)
            twin.planes = {k: v.clone() for k, v in pool.planes.items()}
            batch = _step_batch(toks, first=False)
            batch.before_read.append(lambda *a: calls.append(a))
            with torch.inference_mode():
                out["graph_logits"].append(graphs.run(batch, twin))
            out["graph_hooks"].append(calls[:])
            out["graph_planes"].append(twin.planes)
            calls.clear()
        batch = _step_batch(toks, first=step == 0)
        batch.before_read.append(lambda *a: calls.append(a))
        out["logits"].append(model.forward(batch, pool))
        out["hooks"].append(calls[:])
        calls.clear()
        if graphs is not None and step > 0:
            for k, v in pool.planes.items():  # the graph step stored what the eager one did
                torch.testing.assert_close(out["graph_planes"][-1][k], v, atol=1e-5, rtol=0)
    monkeypatch.setattr(backend, "launch", real_launch)
    out["launched"] = launched
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_kernel_path_matches_torch_path(tmp_path, monkeypatch, arch, dtype):
    seed, prompt_seed, overrides = ARCHS[arch]
    model_dir = write_tiny(tmp_path, arch, seed=seed, **overrides)
    cfg = load_config(model_dir)
    if cfg.is_mla:
        assert PROMPT_LENS[1] + DECODE_STEPS <= cfg.index_topk < PROMPT_LENS[0]
    model = build_model(cfg, Checkpoint(model_dir), dtype, "cpu")
    g = torch.Generator().manual_seed(prompt_seed)
    tokens = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENS]

    # torch path, greedy: its tokens are then fed to the kernel path
    ref_logits, ref_hooks = _greedy(model, cfg, dtype, tokens, monkeypatch)
    graphs = None
    if dtype == torch.float32:  # decode through DecodeGraphs too, with replay run eagerly
        monkeypatch.setattr(DecodeGraphs, "_capture", _capture_on_cpu)
        monkeypatch.setattr(DecodeGraphs, "BATCH_BUCKETS", (4,))  # 2 padding rows
        monkeypatch.setattr(DecodeGraphs, "MIN_WIDTH", 2)  # keep max_len small (32)
        graphs = DecodeGraphs(model)
        assert graphs.enabled, "a plain-tensor model must be graph-safe"
    run = _run_kernels(model, cfg, dtype, tokens, monkeypatch, graphs)
    attention = ["dsa_indexer", "mla_decode"] if cfg.is_mla else ["gqa_decode"]
    for op in ["rmsnorm", "rope", "page_store", "attn_combine", "fused_moe", *attention]:
        assert run["launched"][f"kernels.{op}"] > 0, f"kernels.{op} never ran: {run['launched']}"

    tol = TOL[dtype]
    for step, ref in enumerate(ref_logits):
        top2 = ref.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        assert margin > tol, f"step {step}: top-1 margin {margin:.3f} <= tol; pick other seeds"
    for step, (ref, ker) in enumerate(zip(ref_logits, run["logits"], strict=True)):
        assert ker.argmax(-1).tolist() == ref.argmax(-1).tolist(), f"greedy tokens, step {step}"
        err = (ker - ref).abs().max().item()
        assert err <= tol, f"step {step}: max |logit diff| {err:.2e} > {tol:.0e}"

    planes = list(cfg.plane_widths())
    want = {(li, p, si) for li in range(cfg.num_layers) for p in planes for si in (0, 1)}
    if cfg.is_mla:  # index_k is read on full-indexer layers only
        want = {w for w in want if w[1] == "latent" or cfg.indexer_types[w[0]] == "full"}
    guards = {(li, p, "guard") for li, p, _ in want}
    steps = list(enumerate(run["hooks"])) + list(enumerate(run["graph_hooks"], start=1))
    for step, calls in steps:
        counts = Counter(c[:3] for c in calls)
        assert max(counts.values()) == 1, f"a hook or guard ran twice in step {step}"
        assert set(counts) == want | guards, f"step {step}: {sorted(set(counts) ^ want)}"
        # the guard sees every context row of the batch (fence waits cover all pages read)
        ctx = sum(PROMPT_LENS) + len(PROMPT_LENS) * step
        assert {c[3] for c in calls if c[2] == "guard"} == {ctx}, f"step {step}"
    assert ref_hooks  # the torch path calls hooks too (subset semantics, not compared)

    if graphs is not None:  # same logits from the graph path as from the eager kernel path
        assert len(run["graph_logits"]) == DECODE_STEPS and len(graphs.graphs) == 1
        for glog, ker in zip(run["graph_logits"], run["logits"][1:], strict=True):
            assert glog is not None and glog.shape == ker.shape
            torch.testing.assert_close(glog, ker, atol=1e-5, rtol=0)


def _greedy(model, cfg, dtype, tokens, monkeypatch):
    """Torch path with greedy decoding; appends the chosen tokens to ``tokens`` in place."""
    monkeypatch.delenv("KVSCOPE_TRITON_INTERPRET", raising=False)
    pool = KVPool(cfg.num_layers, 16, PAGE, cfg.plane_widths(), dtype)
    logits, hooks = [], []
    for step in range(DECODE_STEPS + 1):
        batch = _step_batch(tokens, first=step == 0)
        batch.before_read.append(lambda *a: hooks.append(a))
        lg = model.forward(batch, pool)
        logits.append(lg)
        if step < DECODE_STEPS:
            for b, t in enumerate(tokens):
                t.append(int(lg[b].argmax()))
    return logits, hooks


def test_short_contexts_skip_the_indexer(tmp_path, monkeypatch):
    """GLM-5 with every context <= index_topk: the kernel path skips the indexer (no top-k, no
    index_k read) and attends to every causal position, as the torch path does."""
    seed, prompt_seed, overrides = ARCHS["glm_moe_dsa"]
    model_dir = write_tiny(tmp_path, "glm_moe_dsa", seed=seed, **overrides)
    cfg = load_config(model_dir)
    model = build_model(cfg, Checkpoint(model_dir), torch.float32, "cpu")
    ids = torch.randint(2, cfg.vocab_size, (5,), generator=torch.Generator().manual_seed(3))
    rows = token_rows([7], 0, 5, PAGE)
    out, launched = {}, Counter()
    real_launch = backend.launch

    def counting_launch(kernel, grid, device, *args, **kwargs):
        launched[getattr(kernel, "fn", kernel).__module__] += 1
        return real_launch(kernel, grid, device, *args, **kwargs)

    for kernels in (False, True):
        if kernels:
            monkeypatch.setenv("KVSCOPE_TRITON_INTERPRET", "1")
            monkeypatch.setattr(backend, "launch", counting_launch)
        pool = KVPool(cfg.num_layers, 8, PAGE, cfg.plane_widths(), torch.float32)
        calls = []
        batch = ForwardBatch(ids, torch.arange(5), rows, [SeqChunk(0, 5, 0, rows)])
        batch.before_read.append(lambda *a, calls=calls: calls.append(a))
        out[kernels] = (model.forward(batch, pool, all_logits=True), calls)
    assert cfg.index_topk >= 5 and launched["kernels.mla_decode"] > 0
    assert launched["kernels.dsa_indexer"] == 0
    assert {c[1] for c in out[True][1]} == {"latent"}
    torch.testing.assert_close(out[True][0], out[False][0], atol=TOL[torch.float32], rtol=0)


def test_gpu_model_check_runs_on_cpu():
    """gpu-check's "model" check (app/kernel_model_check.py) at tiny sizes through
    the interpreter, so the GPU script does not rot between GPU runs."""
    from app.kernel_model_check import compare

    before = os.environ.get("KVSCOPE_TRITON_INTERPRET")
    r = compare("glm4_moe", torch.float32, "cpu", prompt_lens=(5, 3), steps=1)
    assert r.ok and r.token_mismatches == 0 and r.graphs == 0, r
    assert os.environ.get("KVSCOPE_TRITON_INTERPRET") == before  # restored
