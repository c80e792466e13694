"""The model forward through the Triton kernels (kernels.ops), and CUDA graphs for decode steps.

`CausalLM.forward` comes here when ``kernels.backend.use_triton`` says so: CUDA tensors, or CPU
tensors with ``KVSCOPE_TRITON_INTERPRET=1`` (the kernels then run through Triton's interpreter;
tests/runtime/test_kernel_path.py holds this path to the torch one). The torch path in the model
classes stays the reference and the CPU default.

Per layer: RMSNorm with the residual add fused (``ops.rmsnorm``), attention through the
architecture's ``forward_kernels`` (RoPE, page store, DSA indexer + absorbed sparse MLA, or paged
GQA, all reading KV through per-sequence page tables), MoE through ``ops.fused_moe`` when the
routed experts are plain stacked tensors (``Experts.fused_kernel``; the shared expert, the router
and dense MLPs stay torch). The index tensors come from ``ForwardBatch.kernel_meta``.

CUDA graphs (CUDA only, ``DecodeGraphs``): a decode step (one new token per sequence, sequence b
at flat row b, last-token logits) is replayed from a graph captured per (batch-size bucket,
page-table width bucket) over static input buffers; padding rows store nothing (slot -1) and read
nothing (limit 0). The pool's read guard and the ``before_read`` hooks of every (layer, plane,
sequence) the graph reads run before the replay. Anything that does not fit (prefill chunks, a
batch larger than the largest bucket, quantized / offloaded weights that may sync the host,
``all_logits``) runs eagerly.
``KVSCOPE_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels import ops
from runtime.kv.pool import KVPool
from runtime.model_config import ModelConfig
from runtime.models.batch import ForwardBatch, KernelMeta
from runtime.models.layers import Experts, linear
from runtime.models.rope import RotaryTables

if TYPE_CHECKING:
    from runtime.models.base import CausalLM


class Reads:
    """What must run before a kernel reads one plane of one layer for a batch: the pool's
    ``read_guard`` (fence waits, as ``KVPool.gather`` does) over the batch's context rows, then
    the batch's ``before_read`` hooks once per sequence. Call as ``reads(layer, plane)``."""

    def __init__(self, pool: KVPool, batch: ForwardBatch):
        self.pool, self.batch = pool, batch
        self._rows: torch.Tensor | None = None

    def __call__(self, layer: int, plane: str) -> None:
        if self.pool.read_guard is not None:
            if self._rows is None:
                self._rows = torch.cat([s.ctx_rows for s in self.batch.seqs])
            self.pool.read_guard(layer, plane, self._rows)
        for si in range(len(self.batch.seqs)):
            for hook in self.batch.before_read:
                hook(layer, plane, si)


def no_reads(layer: int, plane: str) -> None:
    """Reads of a CUDA graph's recorded step: guarded before each replay instead."""


def rope_tables(model: CausalLM, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, R] in transformers' layout (cat(freqs, freqs)) for kernels.ops.rope_*."""
    cos, sin = model.rope.cos_sin(positions, model.dtype)  # [T, R/2]
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def run_layers(
    model: CausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    km: KernelMeta,
    pool: KVPool,
    reads,
    last_idx: torch.Tensor | None,
) -> torch.Tensor:
    """Embedding -> layers -> norm -> LM head over the kernels; no host sync (graph-capturable
    when the weights are plain tensors). Returns fp32 logits of ``last_idx`` rows (all if None)."""
    eps = model.cfg.rms_norm_eps
    h = F.embedding(input_ids, model.embed)  # [T, D]
    state = {"cos_sin": rope_tables(model, positions), "topk": None}
    residual = None
    for li, layer in enumerate(model.layers):
        x, residual = ops.rmsnorm(h, layer.input_norm, eps, residual)
        h = layer.attn.forward_kernels(x, km, pool, li, state, reads)
        x, residual = ops.rmsnorm(h, layer.post_norm, eps, residual)
        h = layer.mlp(x)  # MoE.__call__ takes ops.fused_moe when it can
    if last_idx is not None:
        h = h[last_idx]
        residual = residual[last_idx] if residual is not None else None
    h, _ = ops.rmsnorm(h, model.norm, eps, residual)
    return linear(h, model.lm_head).float()


def forward(model: CausalLM, batch: ForwardBatch, pool: KVPool, all_logits: bool) -> torch.Tensor:
    """CausalLM.forward on the kernel path (see the module doc)."""
    if model.device.type == "cuda" and not all_logits:
        graphs = getattr(model, "_decode_graphs", None)
        if graphs is None:
            graphs = model._decode_graphs = DecodeGraphs(model)
        logits = graphs.run(batch, pool)
        if logits is not None:
            return logits
    km = batch.kernel_meta(pool.page_size, model.device)
    last = None if all_logits else batch.last_token_index().to(model.device)
    return run_layers(
        model,
        batch.input_ids.to(model.device),
        batch.positions.to(model.device),
        km,
        pool,
        Reads(pool, batch),
        last,
    )


# --- CUDA graphs for decode steps (CUDA only; not exercised by the CPU tests) -------------------


_MODEL_MODULES = (
    "runtime.models.base",
    "runtime.models.layers",
    "runtime.models.glm_moe_dsa",
    "runtime.models.glm4_moe",
)


def _plain(obj) -> bool:
    """True when every weight under obj is a plain tensor (no quantized / offloaded weight
    objects, whose calls may sync the host and cannot be captured)."""
    if obj is None or isinstance(obj, torch.Tensor | int | float | bool | str):
        return True
    if isinstance(obj, ModelConfig | RotaryTables):
        return True
    if isinstance(obj, Experts):
        return obj.stacked() is not None
    if dataclasses.is_dataclass(obj) and type(obj).__module__ in _MODEL_MODULES:
        return all(_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return False


def graph_safe(model: CausalLM) -> bool:
    """Whether a decode step of this model can be captured (plain weights everywhere)."""
    tops = (model.embed, model.norm, model.lm_head)
    return all(isinstance(t, torch.Tensor) for t in tops) and all(_plain(ly) for ly in model.layers)


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    input_ids: torch.Tensor  # int64 [Bb]
    positions: torch.Tensor  # int64 [Bb]
    km: KernelMeta  # static index buffers, max_len = width * page_size
    logits: torch.Tensor | None  # fp32 [Bb, V] written by each replay


class DecodeGraphs:
    """CUDA graphs of decode steps, one per (batch-size bucket, page-table width bucket)."""

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
    MIN_WIDTH = 16  # pages; widths are powers of two from here
    MAX_GRAPHS = 48

    def __init__(self, model: CausalLM):
        self.model = model
        self.enabled = os.environ.get("KVSCOPE_CUDA_GRAPHS", "1") != "0" and graph_safe(model)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool: KVPool | None = None  # graphs bake in this pool's plane addresses
        self.mempool = None

    def _fits(self, batch: ForwardBatch) -> bool:
        return bool(batch.seqs) and all(
            s.n == 1 and s.offset == b for b, s in enumerate(batch.seqs)
        )

    def run(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor | None:
        """Logits [B, V] of a decode step replayed from a graph, or None (run eagerly)."""
        if not self.enabled or not self._fits(batch):
            return None
        B = len(batch.seqs)
        bb = _bucket(B, self.BATCH_BUCKETS)
        if bb is None:
            return None
        ps = pool.page_size
        need = max(-(-s.end // ps) for s in batch.seqs)
        width = max(self.MIN_WIDTH, 1 << (need - 1).bit_length())
        if pool is not self.pool:  # a new pool: the captured addresses are stale
            self.graphs.clear()
            self.pool = pool
        g = self.graphs.get((bb, width))
        if g is None:
            if len(self.graphs) >= self.MAX_GRAPHS:
                return None
            try:
                g = self._capture(bb, width, pool)
            except Exception as exc:  # e.g. an op that cannot be captured: stay eager
                self.enabled = False
                msg = f"CUDA graph capture failed, decode runs eagerly: {exc!r}"
                warnings.warn(msg, stacklevel=2)
                return None
            self.graphs[(bb, width)] = g
        self._load(g, batch, B, width)
        reads = Reads(pool, batch)
        for li, layer in enumerate(self.model.layers):  # every plane the replay will read
            for plane in layer.attn.read_planes(g.km.max_len):
                reads(li, plane)
        g.graph.replay()
        return g.logits[:B].clone()

    def _load(self, g: _Graph, batch: ForwardBatch, B: int, width: int) -> None:
        dev = self.model.device
        real = KernelMeta.build(batch, g.km.page_size, dev, max_pages=width)
        km = g.km
        g.input_ids[:B].copy_(batch.input_ids.to(dev))
        g.input_ids[B:].zero_()
        g.positions[:B].copy_(batch.positions.to(dev))
        g.positions[B:].zero_()
        km.page_table[:B].copy_(real.page_table)
        km.page_table[B:].zero_()
        km.seq_lens[:B].copy_(real.seq_lens)
        km.seq_lens[B:].zero_()
        km.token_limit[:B].copy_(real.token_limit)
        km.token_limit[B:].zero_()  # padding rows read no key
        km.slot_mapping[:B].copy_(real.slot_mapping)
        km.slot_mapping[B:].fill_(-1)  # padding rows store nothing

    def _buffers(self, bb: int, width: int, pool: KVPool) -> _Graph:
        """Static inputs of a (bb, width) graph, holding a null step (no store, no key read)."""
        dev = self.model.device
        i32 = dict(dtype=torch.int32, device=dev)
        km = KernelMeta(
            page_size=pool.page_size,
            device=dev,
            page_table=torch.zeros((bb, width), **i32),
            seq_lens=torch.zeros(bb, **i32),
            token_seq=torch.arange(bb, **i32),
            token_limit=torch.zeros(bb, **i32),
            slot_mapping=torch.full((bb,), -1, dtype=torch.int64, device=dev),
            max_len=width * pool.page_size,
        )
        ids = torch.zeros(bb, dtype=torch.long, device=dev)
        pos = torch.zeros(bb, dtype=torch.long, device=dev)
        return _Graph(None, ids, pos, km, None)

    def _step_fn(self, g: _Graph, pool: KVPool):
        """The decode step over g's static buffers (what the graph records)."""
        return lambda: run_layers(self.model, g.input_ids, g.positions, g.km, pool, no_reads, None)

    def _capture(self, bb: int, width: int, pool: KVPool) -> _Graph:
        dev = self.model.device
        g = self._buffers(bb, width, pool)
        step = self._step_fn(g, pool)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # null steps: compile the Triton kernels, warm the allocator
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph, pool=self.mempool, capture_error_mode="thread_local"):
            g.logits = step()
        return g


__all__ = ["forward", "run_layers", "DecodeGraphs", "graph_safe", "Reads", "no_reads"]
