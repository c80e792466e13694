"""The compiled CPU decode step (runtime/models/cpu_graph.py, decode_step.py) vs the eager path.

- decode_step (uncompiled: the same tensor function AOTInductor compiles) through
  CpuDecodeGraph.run against CausalLM.forward, both architectures, a batch of 3 sequences
  (bucket 4: one padding row) with contexts shorter and longer than index_topk, scattered page
  slots, 64 context columns for contexts of < 20 positions (padding columns masked): same
  argmax, logits within 1e-5 (fp32), the same KV rows stored, every plane read guarded.
- moe_decode's two ways (gathered experts for B*K < E, every expert for B*K >= E) vs MoE.
- A real AOTInductor compile of one bucket per architecture: an engine decoding through it emits
  the eager engine's tokens; a failing compile leaves decode eager with the same tokens.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from runtime.engine import Engine, EngineConfig
from runtime.kv.pool import KVPool, token_rows
from runtime.model_config import load_config
from runtime.models import build_model, cpu_graph
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.models.cpu_graph import CpuDecodeGraph, bucket_of
from runtime.models.decode_step import moe_decode
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.tiny import write_tiny

PAGE = 4
PROMPTS = (11, 3, 7)  # index_topk of the tiny GLM-5 config is 6: longer, shorter, longer
PAGES = [[9, 2, 14, 5, 0], [3, 12], [7, 1, 10, 4]]
DECODE_STEPS = 4


def _batch(tokens: list[list[int]], first: bool) -> ForwardBatch:
    ids, pos, rows, seqs, off = [], [], [], [], 0
    for b, toks in enumerate(tokens):
        end = len(toks)
        start = 0 if first else end - 1
        ctx = token_rows(PAGES[b], 0, end, PAGE)
        ids += toks[start:end]
        pos += range(start, end)
        rows.append(ctx[start:end])
        seqs.append(SeqChunk(start, end, off, ctx, pages=PAGES[b]))
        off += end - start
    return ForwardBatch(torch.tensor(ids), torch.tensor(pos), torch.cat(rows), seqs)


def _uncompiled(self, bucket):
    """CpuDecodeGraph._compile without compiling: the plain tensor function."""
    return lambda step, *args: step(*args)


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "glm4_moe"])
def test_decode_step_matches_eager_forward(tmp_path, monkeypatch, arch):
    model_dir = write_tiny(tmp_path, arch, seed=3)
    cfg = load_config(model_dir)
    model = build_model(cfg, Checkpoint(model_dir), torch.float32, "cpu")
    pool = KVPool(cfg.num_layers, 16, PAGE, cfg.plane_widths(), torch.float32)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPTS]
    model.forward(_batch(tokens, first=True), pool)  # prefill, eager
    monkeypatch.setattr(CpuDecodeGraph, "_compile", _uncompiled)

    for step in range(DECODE_STEPS):
        twin = copy.copy(pool)
        twin.planes = {k: v.clone() for k, v in pool.planes.items()}
        graph = CpuDecodeGraph(model, twin)
        assert graph.enabled
        batch = _batch(tokens, first=False)
        bucket = bucket_of(len(PROMPTS), max(len(t) for t in tokens))
        assert bucket == (4, 64)  # one padding row, >= 45 padding columns per sequence
        assert graph.run(batch, twin) is None  # not compiled yet: eager, and queued
        assert graph.wait_idle(60) and graph.buckets_ready == [bucket]

        eager_reads, graph_reads = [], []
        batch.before_read.append(lambda *a, sink=eager_reads: sink.append(a))
        ref = model.forward(batch, pool)

        guards = []
        twin.read_guard = lambda layer, plane, rows, sink=guards: sink.append(
            (layer, plane, len(rows))
        )
        gbatch = _batch(tokens, first=False)
        gbatch.before_read.append(lambda *a, sink=graph_reads: sink.append(a))
        got = graph.run(gbatch, twin)
        assert got is not None and got.shape == ref.shape

        assert got.argmax(-1).tolist() == ref.argmax(-1).tolist(), f"greedy tokens, step {step}"
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        for name, plane in pool.planes.items():  # the same rows stored, nothing else touched
            torch.testing.assert_close(twin.planes[name], plane, atol=1e-5, rtol=0)
        assert set(eager_reads) <= set(graph_reads), "a plane read without its hook"
        assert len(graph_reads) == len(set(graph_reads)), "a hook ran twice"
        ctx = sum(len(t) for t in tokens)
        assert {(li, p) for li, p, _ in graph_reads} == {(li, p) for li, p, _ in guards}
        assert {n for _, _, n in guards} == {ctx}, "the guard sees every context row"
        for b, row in enumerate(ref.argmax(-1).tolist()):
            tokens[b].append(row)


@pytest.mark.parametrize("batch", [1, 3, 7, 11])
def test_moe_decode_matches_moe(tiny_dsa, batch):
    cfg = load_config(tiny_dsa)
    model = build_model(cfg, Checkpoint(tiny_dsa), torch.float32, "cpu")
    moe = model.layers[1].mlp  # layer 0 is dense; E = 8, K = 3: B <= 10 gather, 11 dense
    x = torch.randn(batch, cfg.hidden_size, generator=torch.Generator().manual_seed(batch))
    torch.testing.assert_close(moe_decode(moe, x), moe(x), atol=1e-5, rtol=1e-5)


def _generate(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    rids = [engine.submit(prompt_ids=p, max_new_tokens=n, ignore_eos=True) for p in prompts]
    engine.run_until_done()
    return [engine.request(r).output_ids for r in rids]


# arch -> (prompt lengths, frozen weights): GLM-5 with 3 sequences (bucket 4, 12 >= 8 experts:
# every expert runs) and the weights frozen into the library (autotuned C++ GEMMs); GLM-4.x with
# 2 (bucket 2, 4 < 8: the selected experts are gathered) and the weights passed as inputs, the
# mode of models above FROZEN_MAX_BYTES
COMPILED = {"glm_moe_dsa": ((9, 4, 7), True), "glm4_moe": ((9, 4), False)}


def _cxx() -> str | None:
    """The C++ compiler Inductor would use (CXX, else the usual names)."""
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


@pytest.mark.skipif(_cxx() is None, reason="no C++ compiler: CPU decode stays eager (tested)")
@pytest.mark.parametrize("arch", list(COMPILED))
def test_compiled_engine_emits_the_eager_tokens(tmp_path, monkeypatch, arch):
    """One real export + AOTInductor compile per arch (frozen + autotuned: ~60-90 s on 2
    cores; weights as inputs: ~15-30 s)."""
    model_dir = write_tiny(tmp_path, arch, seed=5, num_hidden_layers=2)
    g = torch.Generator().manual_seed(2)
    lengths, frozen = COMPILED[arch]
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in lengths]
    conf = EngineConfig(device="cpu", page_size=PAGE)
    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "0")
    want = _generate(Engine(model_dir, conf), prompts, 12)

    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "1")
    monkeypatch.setattr(cpu_graph, "FROZEN_MAX_BYTES", 1 << 30 if frozen else 0)
    engine = Engine(model_dir, conf)
    assert engine.cpu_graph is not None and engine.cpu_graph.frozen == frozen
    bucket = bucket_of(len(prompts), 9 + 12)
    engine.cpu_graph.request(bucket)
    assert engine.cpu_graph.wait_idle(900), "compile did not finish"
    assert engine.cpu_graph.failed is None, engine.cpu_graph.failed
    got = _generate(engine, prompts, 12)
    assert got == want
    assert engine.cpu_graph.steps_compiled >= 10  # every full-batch decode step
    worker = engine.cpu_graph._worker
    engine.close()  # the compile thread ends, letting go of the model and pool
    worker.join(10)
    assert not worker.is_alive()

    # a second engine of the same model reuses the library from the process cache
    again = Engine(model_dir, conf)
    again.cpu_graph.request(bucket)
    assert again.cpu_graph.buckets_ready == [bucket] and again.cpu_graph._worker is None
    assert _generate(again, prompts, 12) == want
    assert again.cpu_graph.steps_compiled >= 10
    again.close()


def test_compile_failure_keeps_decoding_eagerly(tiny_dsa, monkeypatch, tmp_path, capfd):
    def broken(self, bucket):
        import logging

        logging.getLogger("torch._inductor.fake").error("torch's own noisy record")
        raise RuntimeError("no C++ compiler\nsecond line of detail")

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 200, (8,), generator=g).tolist()]
    conf = EngineConfig(device="cpu", page_size=PAGE)
    want = _generate(Engine(tiny_dsa, conf), prompts, 8)
    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(CpuDecodeGraph, "_compile", broken)
    engine = Engine(tiny_dsa, conf)
    capfd.readouterr()
    got = _generate(engine, prompts, 8)
    engine.cpu_graph.wait_idle(60)
    got += _generate(engine, prompts, 8)
    assert got == want * 2
    assert not engine.cpu_graph.enabled and "no C++ compiler" in engine.cpu_graph.failed
    assert engine.cpu_graph.steps_compiled == 0
    # one line on stderr (what, which bucket, eager, where the traceback is); no traceback
    err = capfd.readouterr().err
    log = tmp_path / "kvscope" / "cpu_graph.log"
    assert err.splitlines() == [
        "kvscope: CPU decode graph: compiling bucket (batch 1, 64 columns) failed "
        f"(RuntimeError: no C++ compiler); decode stays eager; traceback in {log}"
    ]
    assert "Traceback" in log.read_text() and "second line of detail" in log.read_text()
    assert "torch's own noisy record" in log.read_text()  # torch's log: the file, not stderr
    engine.close()


def test_compiles_are_serialised_process_wide(tiny_dsa, monkeypatch):
    """Two engines asking at once: their compiles never overlap (torch's tracing state is
    process-global)."""
    import threading
    import time

    active, peak, done = [0], [0], []
    lock = threading.Lock()

    def fake(self, bucket):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        done.append(bucket)
        return lambda *a: None

    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "1")
    monkeypatch.setattr(CpuDecodeGraph, "_compile", fake)
    conf = EngineConfig(device="cpu", page_size=PAGE)
    engines = [Engine(tiny_dsa, conf) for _ in range(2)]
    for e in engines:
        e.cpu_graph._key = None  # no sharing through the process cache
        e.cpu_graph.request((1, 64))
        e.cpu_graph.request((4, 64))
    assert all(e.cpu_graph.wait_idle(30) for e in engines)
    assert len(done) == 4 and peak[0] == 1
    for e in engines:
        e.close()


def test_cpu_graph_off_and_ineligible(tiny_dsa, monkeypatch):
    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "1")
    assert Engine(tiny_dsa, EngineConfig(device="cpu", cpu_graph="off")).cpu_graph is None
    assert Engine(tiny_dsa, EngineConfig(device="cpu", quant="nf4")).cpu_graph is None
    assert Engine(tiny_dsa, EngineConfig(device="cpu", quant="int8")).cpu_graph is not None
    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "0")
    assert Engine(tiny_dsa, EngineConfig(device="cpu")).cpu_graph is None


def test_warm_runs_the_workload_until_no_step_is_eager(tiny_dsa, monkeypatch):
    """warm(): round 1 decodes eagerly and queues its bucket, round 2 runs compiled, then stops."""
    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "1")
    monkeypatch.setattr(CpuDecodeGraph, "_compile", _uncompiled)
    engine = Engine(tiny_dsa, EngineConfig(device="cpu", page_size=PAGE))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, 200, (n,), generator=g).tolist() for n in (5, 9)]
    rounds = []

    def workload():
        rounds.append(g_.steps_eager)
        _generate(engine, prompts, 6)

    g_ = engine.cpu_graph
    assert g_.warm(workload)
    assert len(rounds) == 2 and rounds[0] == 0 < rounds[1]  # eager, then all compiled
    assert g_.buckets_ready == [bucket_of(2, 15)] and g_.steps_compiled >= 5
    engine.close()
