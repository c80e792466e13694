"""The model runner: how each forward step of an engine runs, chosen once per engine.

One place owns the choice between
- a replayed CUDA graph of a decode step (CUDA; runtime/models/cuda_graph.py),
- a compiled CPU decode step (CPU with plain weights; runtime/models/cpu_graph.py),
- the eager forward through the engine's step backend: the Triton kernels (CUDA, or CPU with
  KVSCOPE_TRITON_INTERPRET=1) or plain torch (runtime/models/steps.py).
Graphs serve only what they fit (decode steps of a bucketed batch, last-token logits); anything
else, and any step whose graph is not ready yet, runs eagerly. All of them are the model's one
forward (``CausalLM.run``) over a different step backend, so the tokens are the same.
"""

from __future__ import annotations

from kernels.backend import use_triton
from runtime.errors import KvscopeError
from runtime.kv.pool import KVPool
from runtime.models.base import CausalLM
from runtime.models.batch import ForwardBatch


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, cpu_graph: str = "auto", model_key=""):
        """``cpu_graph``: "auto" | "off" (EngineConfig.cpu_graph); ``model_key`` names the
        checkpoint, dtype and page size, so compiled CPU steps are shared across engines of a
        process (runtime/models/cpu_graph.py)."""
        if cpu_graph not in ("auto", "off"):
            raise KvscopeError(f"--cpu-graph {cpu_graph}: choose auto or off")
        self.model, self.pool = model, pool
        self.kernels = use_triton(model.device)  # the step backend: Triton kernels or torch
        self.cuda_graphs = None
        self.cpu_graph = None
        if model.device.type == "cuda":
            from runtime.models.cuda_graph import DecodeGraphs

            self.cuda_graphs = DecodeGraphs(model)
        elif not self.kernels:
            from runtime.models.cpu_graph import CpuDecodeGraph, cpu_graph_requested

            if cpu_graph_requested(cpu_graph):
                g = CpuDecodeGraph(model, pool, model_key)
                self.cpu_graph = g if g.enabled else None

    def forward(self, batch: ForwardBatch, all_logits: bool = False, keep_hidden: bool = False):
        """Logits [R, V] of each sequence's last ``n_logits`` new tokens ([T, V] with
        all_logits); with ``keep_hidden`` the pair (logits, final-norm hidden [T, D])."""
        if not all_logits and not keep_hidden and batch.plain:
            for graphs in (self.cuda_graphs, self.cpu_graph):
                if graphs is not None:
                    logits = graphs.run(batch, self.pool)
                    if logits is not None:
                        return logits
        return self.model.forward(batch, self.pool, all_logits, self.kernels, keep_hidden)

    def describe(self) -> str:
        """How decode steps run (the model info panel): eager, CUDA graphs, or compiled CPU
        graphs and which buckets are ready."""
        if self.cuda_graphs is not None:
            return "kernels + CUDA graphs" if self.cuda_graphs.enabled else "kernels"
        g = self.cpu_graph
        if g is None:
            return "kernels (Triton interpreter)" if self.kernels else "eager"
        if g.failed:
            return "eager (CPU graph compile failed)"
        ready = ", ".join(f"b{b}x{c}" for b, c in g.buckets_ready) or "compiling"
        return f"compiled CPU graph ({ready})"

    def close(self) -> None:
        """End the CPU graph's compile thread (Engine.close)."""
        if self.cpu_graph is not None:
            self.cpu_graph.close()


__all__ = ["ModelRunner"]
