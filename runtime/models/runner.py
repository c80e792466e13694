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
        if keep_hidden and not all_logits and self.cpu_graph is not None:
            got = self._verify(batch)
            if got is not None:
                return got
        return self.model.forward(batch, self.pool, all_logits, self.kernels, keep_hidden)

    def speculate(self, draft_tokens: int) -> None:
        """Compile the speculative steps of k = draft_tokens: verify k + 1 tokens per
        sequence, the MTP layer over k + 1 rows (extend) and over 1 row (the chain)."""
        if self.cpu_graph is not None:
            k = draft_tokens
            self.cpu_graph.spec_rows = {
                "verify": {k + 1},
                "mtp": {k + 1} | ({1} if k > 1 else set()),
            }

    def _verify(self, batch: ForwardBatch):
        """A speculative verify step (every sequence n tokens, the logits of all n) through a
        compiled bucket: (logits, hidden), or None."""
        if not all(s.n_logits == s.n for s in batch.seqs):
            return None
        return self.cpu_graph.run_spec("verify", batch, self.pool)

    def draft(self, batch: ForwardBatch, prev_hidden):
        """The MTP layer over a batch (runtime/speculative.py): compiled when every sequence
        has the same number of rows and returns them all, else eagerly. (logits of each
        sequence's last n_logits rows, outputs [T, D])."""
        if self.cpu_graph is not None and all(s.n_logits == s.n for s in batch.seqs):
            got = self.cpu_graph.run_spec("mtp", batch, self.pool, prev_hidden)
            if got is not None:
                return got
        return self.model.draft(batch, self.pool, prev_hidden, self.kernels)

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
        ready = ", ".join(bucket_name(b) for b in g.buckets_ready) or "compiling"
        return f"compiled CPU graph ({ready})"

    def close(self) -> None:
        """End the CPU graph's compile thread (Engine.close)."""
        if self.cpu_graph is not None:
            self.cpu_graph.close()


def bucket_name(bucket) -> str:
    """b1x64 (a decode bucket), verify3-b1x64 / mtp3-b1x64 (speculative ones)."""
    kind = f"{bucket[2]}{bucket[3]}-" if len(bucket) > 2 else ""
    return f"{kind}b{bucket[0]}x{bucket[1]}"


__all__ = ["ModelRunner", "bucket_name"]
