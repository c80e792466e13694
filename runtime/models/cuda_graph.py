"""CUDA graphs of decode steps (CUDA only; tests/runtime/test_kernel_path.py replays the recorded
step eagerly on CPU).

A decode step (one new token per sequence, sequence b at flat row b, last-token logits) is the
model's one forward (``CausalLM.run``) over a ``KernelStep`` (runtime/models/steps.py), replayed
from a graph captured per (batch-size bucket, page-table width bucket) over static input buffers;
padding rows store nothing (slot -1) and read nothing (limit 0). The pool's read guard and the
``before_read`` hooks of every (layer, plane, sequence) the graph reads run before the replay.
Anything that does not fit (prefill chunks, a batch larger than the largest bucket, quantized /
offloaded weights that may sync the host, ``all_logits``) runs eagerly. The model runner
(runtime/models/runner.py) decides; ``KVSCOPE_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import TYPE_CHECKING

import torch

from runtime.kv.pool import KVPool
from runtime.models.base import graph_safe
from runtime.models.batch import ForwardBatch, KernelMeta
from runtime.models.steps import KernelStep, Reads, no_reads, read_every_plane

if TYPE_CHECKING:
    from runtime.models.base import CausalLM


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
        read_every_plane(self.model, Reads(pool, batch), g.km.max_len)  # what the replay reads
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
        model = self.model

        def step():
            kernels = KernelStep(model, g.positions, g.km, pool, no_reads, last_idx=None)
            return model.run(g.input_ids, kernels)

        return step

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


__all__ = ["DecodeGraphs"]
