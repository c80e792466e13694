"""L2 host pool: page copies in host memory (pinned when CUDA) and their own free-slot allocator.

Planes mirror the L1 pool's layout, `[num_layers, num_host_slots, page_size, *tail]` per plane,
so a copy moves whole pages between the tiers with the same slot arithmetic. Each host slot has a
small record: FREE -> WRITING (a backup or an L3 read is landing) -> READY (bytes complete, with
the checksums of the L1 data they came from, invariant 4) -> FREE. `busy` counts transfers reading
the slot (a load-back to L1, a write to L3): a busy slot is never freed.
All methods run on the engine thread, except that copies touch `planes` from the copy thread
between the WRITING/busy bookkeeping the engine thread does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["PlaneSpec", "plane_specs", "HostSlot", "HostPool"]


class PlaneSpec(NamedTuple):
    """Shape of one plane per token: `tail` after [layers, slots, page_size], and its dtype."""

    tail: tuple[int, ...]
    dtype: torch.dtype

    def page_bytes(self, num_layers: int, page_size: int) -> int:
        n = num_layers * page_size
        for d in self.tail:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plane_specs(planes: Mapping[str, torch.Tensor]) -> dict[str, PlaneSpec]:
    """Specs of pool planes [L, S, P, *tail] (the L1 pool's tensors)."""
    return {name: PlaneSpec(tuple(t.shape[3:]), t.dtype) for name, t in planes.items()}


@dataclass
class HostSlot:
    state: str = "FREE"  # FREE | WRITING | READY
    checksums: dict[str, int] | None = None
    busy: int = 0  # transfers reading this slot


class HostPool:
    """`num_slots` host page slots for planes `specs` of `num_layers` layers."""

    def __init__(
        self,
        specs: Mapping[str, PlaneSpec],
        num_layers: int,
        num_slots: int,
        page_size: int,
        pin: bool = False,
    ) -> None:
        assert num_slots > 0
        self.specs = dict(specs)
        self.num_layers = num_layers
        self.page_size = page_size
        pin = pin and torch.cuda.is_available()
        self.planes: dict[str, torch.Tensor] = {
            name: torch.zeros(
                (num_layers, num_slots, page_size, *spec.tail), dtype=spec.dtype, pin_memory=pin
            )
            for name, spec in self.specs.items()
        }
        self.pinned = pin
        self.slots = [HostSlot() for _ in range(num_slots)]
        self._free = list(range(num_slots - 1, -1, -1))

    @classmethod
    def slots_for_bytes(
        cls, specs: Mapping[str, PlaneSpec], num_layers: int, page_size: int, nbytes: int
    ) -> int:
        """How many host slots fit in `nbytes` (the --kv-host-mem budget)."""
        per_page = sum(s.page_bytes(num_layers, page_size) for s in specs.values())
        return nbytes // max(per_page, 1)

    # ---- accounting (pure) -------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def bytes_per_page(self) -> int:
        return sum(s.page_bytes(self.num_layers, self.page_size) for s in self.specs.values())

    @property
    def bytes_total(self) -> int:
        return self.bytes_per_page * self.num_slots

    @property
    def bytes_used(self) -> int:
        return self.bytes_per_page * (self.num_slots - self.num_free)

    def page(self, slot: int) -> dict[str, torch.Tensor]:
        """Views of one host page per plane, [L, P, *tail] (not contiguous across layers)."""
        return {name: t[:, slot] for name, t in self.planes.items()}

    # ---- slot life cycle ---------------------------------------------------------------------
    def alloc(self, n: int) -> list[int] | None:
        """Take `n` FREE slots (all or none) -> WRITING."""
        if n > len(self._free):
            return None
        out = [self._free.pop() for _ in range(n)]
        for slot in out:
            rec = self.slots[slot]
            assert rec.state == "FREE" and rec.busy == 0
            rec.state = "WRITING"
        return out

    def mark_ready(self, slot: int, checksums: dict[str, int]) -> None:
        """WRITING -> READY: the copy landed; `checksums` are those of the data it came from."""
        rec = self.slots[slot]
        assert rec.state == "WRITING", (slot, rec.state)
        rec.state = "READY"
        rec.checksums = dict(checksums)

    def acquire(self, slot: int) -> None:
        """A transfer starts reading a READY slot."""
        rec = self.slots[slot]
        assert rec.state == "READY", (slot, rec.state)
        rec.busy += 1

    def release(self, slot: int) -> None:
        rec = self.slots[slot]
        assert rec.busy > 0
        rec.busy -= 1

    def free(self, slot: int) -> None:
        """Any non-busy slot -> FREE (a landed copy dropped, or a failed write abandoned)."""
        rec = self.slots[slot]
        assert rec.state != "FREE" and rec.busy == 0, (slot, rec)
        rec.state = "FREE"
        rec.checksums = None
        self._free.append(slot)

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free)
        for i, rec in enumerate(self.slots):
            assert (rec.state == "FREE") == (i in free), (i, rec)
            assert rec.busy >= 0
            assert rec.busy == 0 or rec.state == "READY"
            assert (rec.checksums is not None) == (rec.state == "READY")
