"""L2 host pool: slot life cycle, busy guard, byte accounting."""

from __future__ import annotations

import pytest
import torch

from runtime.kv.host_pool import HostPool, PlaneSpec, plane_specs


def test_specs_and_accounting():
    l1 = {
        "latent": torch.zeros(3, 5, 4, 6, dtype=torch.bfloat16),
        "index_k": torch.zeros(3, 5, 4, 2),
    }
    specs = plane_specs(l1)
    assert specs["latent"] == PlaneSpec((6,), torch.bfloat16)
    pool = HostPool(specs, 3, 4, 4)
    assert pool.planes["latent"].shape == (3, 4, 4, 6) and not pool.pinned
    assert pool.bytes_per_page == 3 * 4 * (6 * 2 + 2 * 4)
    assert HostPool.slots_for_bytes(specs, 3, 4, pool.bytes_per_page * 7 + 1) == 7
    assert pool.bytes_used == 0 and pool.bytes_total == 4 * pool.bytes_per_page
    slots = pool.alloc(2)
    assert pool.bytes_used == 2 * pool.bytes_per_page
    assert pool.alloc(3) is None  # all or none
    assert pool.page(slots[0])["latent"].shape == (3, 4, 6)


def test_slot_life_cycle_and_busy_guard():
    pool = HostPool({"k": PlaneSpec((2,), torch.float32)}, 1, 2, 2)
    (s,) = pool.alloc(1)
    with pytest.raises(AssertionError):
        pool.acquire(s)  # WRITING: nothing may read it yet
    pool.mark_ready(s, {"k": 7})
    pool.acquire(s)
    with pytest.raises(AssertionError):
        pool.free(s)  # a transfer still reads it
    pool.release(s)
    pool.free(s)
    assert pool.num_free == 2
    pool.check_invariants()
