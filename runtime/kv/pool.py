"""L1 page pool: the bytes of every KV plane, indexed by page slot.

Layout: for each plane name a tensor [num_layers, num_slots, page_size, *tail]. Token position p
of a sequence whose page table is `pt` lives at slot pt[p // page_size], offset p % page_size;
flat index `slot * page_size + offset` addresses one token row of a layer's plane.

Who writes: only the model's store step (`store`) for the tokens a step computes, and tier
load-back copies into LOADING pages. Who reads: the attention of the request(s) owning the page,
through `gather`, after the page's fence (see runtime/kv/copy_engine.py and docs/architecture.md).
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        page_size: int,
        planes: dict[str, tuple[int, ...]],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        assert num_slots > 0 and page_size > 0
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        # Called by every read accessor before it reads (fence wait, invariant 2); set by the
        # engine's KV stack. Signature: (layer, plane, rows).
        self.read_guard = None
        self.planes: dict[str, torch.Tensor] = {
            name: torch.zeros(
                (num_layers, num_slots, page_size, *tail), dtype=dtype, device=self.device
            )
            for name, tail in planes.items()
        }

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one page slot across all layers and planes."""
        return sum(t[:, 0].numel() * t.element_size() for t in self.planes.values())

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_page * self.num_slots

    def flat(self, layer: int, name: str) -> torch.Tensor:
        """View of one layer's plane as [num_slots * page_size, *tail] token rows."""
        t = self.planes[name][layer]
        return t.view(self.num_slots * self.page_size, *t.shape[2:])

    def store(self, layer: int, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write token rows: rows [T] flat indices, values [T, *tail]."""
        self.flat(layer, name).index_copy_(0, rows, values.to(self.dtype))

    def store_layers(
        self, name: str, layers: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Write the same token rows of several layers at once: layers [Ln], rows [T] flat
        indices, values [Ln, T, *tail] (one op instead of Ln; the compiled decode step)."""
        t = self.planes[name]
        flat = t.view(self.num_layers, self.num_slots * self.page_size, *t.shape[3:])
        flat.index_put_((layers[:, None], rows[None, :]), values.to(self.dtype))

    def gather(self, layer: int, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Read token rows [N] -> [N, *tail], after their pages' fences for this layer."""
        if self.read_guard is not None:
            self.read_guard(layer, name, rows)
        return self.flat(layer, name).index_select(0, rows)


def token_rows(page_table: list[int] | torch.Tensor, start: int, end: int, page_size: int):
    """Flat row indices [end - start] for positions start..end-1 of a sequence."""
    pt = torch.as_tensor(page_table, dtype=torch.long)
    pos = torch.arange(start, end, dtype=torch.long)
    return pt[pos // page_size] * page_size + pos % page_size
