"""Layer ownership: which rank stores layer l's KV planes, and the per-rank L1 store.

A layer's bytes per token are the planes it really writes: MLA `latent` on every layer plus the
DSA `index_k` on layers with their own indexer ("full"); GQA `k` and `v`. Ownership is a
contiguous, byte-balanced partition (greedy in layer order: rank r takes layers until its
cumulative bytes reach the nearest multiple of total / N). Contiguous blocks keep decode cheap:
the decode hidden state hops to a new owner at most N - 1 times per token (docs/layersplit.md).
The layer count need not divide the rank count; with more ranks than layers some own nothing.
"""

from __future__ import annotations

import math

import torch

from runtime.config import ModelConfig
from runtime.kv.pool import KVPool


def layer_planes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Planes layer `layer` stores per token (name -> tail shape)."""
    widths = cfg.plane_widths()
    if cfg.is_mla and cfg.indexer_types[layer] != "full":
        return {"latent": widths["latent"]}
    return widths


def layer_token_bytes(cfg: ModelConfig, layer: int, elem_bytes: int) -> int:
    """KV bytes one token adds to one layer."""
    return sum(math.prod(t) for t in layer_planes(cfg, layer).values()) * elem_bytes


def assign_layers(layer_bytes: list[int], n_ranks: int) -> list[tuple[int, ...]]:
    """rank -> owned layer ids: contiguous blocks, greedy in layer order, balanced by bytes."""
    assert n_ranks >= 1
    total, owners, acc, rank = sum(layer_bytes), [[] for _ in range(n_ranks)], 0, 0
    for li, b in enumerate(layer_bytes):
        left_layers = len(layer_bytes) - li
        left_ranks = n_ranks - rank - 1
        boundary = total * (rank + 1) / n_ranks
        # move on when this layer lands nearer the next boundary, or to keep one layer per rank
        # while layers remain for every later rank
        if owners[rank] and left_ranks > 0:
            over = acc + b - boundary
            if over > boundary - acc or left_layers <= left_ranks:
                rank += 1
        owners[rank].append(li)
        acc += b
    return [tuple(o) for o in owners]


def owner_of(owners: list[tuple[int, ...]]) -> dict[int, int]:
    return {li: r for r, ls in enumerate(owners) for li in ls}


class RankKV:
    """One rank's L1 store: a KVPool per plane holding only its owned layers that write it
    (num_layers = that count) and a map global layer -> local index. store/gather take global
    layer ids, like KVPool's."""

    def __init__(self, cfg: ModelConfig, layers, num_slots: int, page_size: int, dtype, device):
        self.layers = tuple(layers)
        self.local: dict[str, dict[int, int]] = {}
        widths = cfg.plane_widths()
        self.pools: dict[str, KVPool] = {}
        for name, tail in widths.items():
            ls = [li for li in self.layers if name in layer_planes(cfg, li)]
            if ls:
                self.local[name] = {li: i for i, li in enumerate(ls)}
                self.pools[name] = KVPool(
                    len(ls), num_slots, page_size, {name: tail}, dtype, device
                )

    @property
    def total_bytes(self) -> int:
        return sum(p.total_bytes for p in self.pools.values())

    def store(self, layer: int, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.pools[name].store(self.local[name][layer], name, rows, values)

    def gather(self, layer: int, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self.pools[name].gather(self.local[name][layer], name, rows)
