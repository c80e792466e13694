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

from runtime.kv.pool import KVPool
from runtime.model_config import ModelConfig


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


def contiguous_range(layers: tuple[int, ...]) -> tuple[int, int]:
    """[first, last + 1) of a contiguous block of layers (the L3 header's layer range)."""
    if not layers:
        return (0, 0)
    if tuple(layers) != tuple(range(layers[0], layers[-1] + 1)):
        raise ValueError(f"layers {layers} are not contiguous")
    return (layers[0], layers[-1] + 1)


class RankKV:
    """One rank's L1 page pool: one KVPool whose layer axis is the rank's owned layers (local
    index i = the i-th owned layer) and whose planes are those the owned layers write.

    One layer count for every plane of a page is what the L2 host pool, the L3 file layout and
    the copy engine's per-layer fences need, so a rank owning both DSA `full` and `shared`
    layers keeps an (unused) `index_k` row for its shared layers, as the single-rank pool does
    for every layer. Per-rank bytes are therefore exactly owned/all of the single-rank pool of
    the same slot count (less when every owned layer is `shared`: no `index_k` at all).
    store/gather take global layer ids."""

    def __init__(self, cfg: ModelConfig, layers, num_slots: int, page_size: int, dtype, device):
        self.layers = tuple(layers)
        self.local = {li: i for i, li in enumerate(self.layers)}  # global layer -> local index
        written: set[str] = set()
        for li in self.layers:
            written |= set(layer_planes(cfg, li))
        widths = {n: t for n, t in cfg.plane_widths().items() if n in written}
        self.pool = KVPool(len(self.layers), num_slots, page_size, widths, dtype, device)

    @property
    def planes(self) -> dict[str, torch.Tensor]:
        """Plane tensors [owned layers, slots, page_size, *tail] (what the tiers copy)."""
        return self.pool.planes

    @property
    def total_bytes(self) -> int:
        return self.pool.total_bytes

    @property
    def bytes_per_page(self) -> int:
        return self.pool.bytes_per_page

    def store(self, layer: int, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        self.pool.store(self.local[layer], name, rows, values)

    def gather(self, layer: int, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows [N] of the owned layer `layer` -> [N, *tail], after its load fences (the pool's
        read guard, installed by RankTiers)."""
        return self.pool.gather(self.local[layer], name, rows)
