"""Agreement between ranks: lock-step all-reduces of small int vectors.

Every decision that depends on a rank's local state (how many prefix pages its tiers still
hold, whether an allocation fit, whether a request timed out, whether its writers of an aborted
sequence drained) is agreed with one of these before any rank acts on it. Every rank must call
them in the same order with vectors of the same length (the callers guarantee it: the vectors
are indexed by sequences every rank knows in the same order).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Collective:
    """MIN / MAX all-reduce over int lists; identity for a single rank. Counts rounds, bytes
    (payload per rank) and time spent."""

    def __init__(self, world: int, device: torch.device | str = "cpu") -> None:
        self.world = world
        self.device = torch.device(device)  # NCCL reduces CUDA tensors, gloo CPU ones
        self.rounds = 0
        self.bytes = 0
        self.time_s = 0.0

    def min(self, values: list[int]) -> list[int]:
        return self._reduce(values, dist.ReduceOp.MIN)

    def max(self, values: list[int]) -> list[int]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[int], op) -> list[int]:
        values = [int(v) for v in values]
        if self.world == 1 or not values:
            return values
        t0 = time.perf_counter()
        buf = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(buf, op=op)
        out = buf.tolist()
        self.rounds += 1
        self.bytes += buf.numel() * buf.element_size()
        self.time_s += time.perf_counter() - t0
        return out
