"""page_store: Triton vs reference, exact (a copy; fp32 -> bf16 casts round to nearest even
on both)."""

import pytest
import torch

from kernels.page_store import page_store, reference_page_store


def _pool(L, S, P, row, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, S, P, *row, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_latent_halves(page_size, dtype, device):
    """Store the kv_lora part and the k_rot part of the MLA latent row separately."""
    L, S, lora, rope, T = 2, 12, 40, 16, 9
    pool = _pool(L, S, page_size, (lora + rope,), dtype, device, page_size)
    plane, plane_ref = pool[1], pool.clone()[1]  # per-layer views of the pool
    g = torch.Generator().manual_seed(1)
    flat = torch.randperm(S * page_size, generator=g)[:T]
    flat[2] = -1  # padding row: skipped
    flat = flat.to(device)
    kv = torch.randn(T, lora + 8, generator=g).to(dtype).to(device)[:, 4 : 4 + lora]  # strided
    k_rot = torch.randn(T, rope, generator=g).to(dtype).to(device)
    for fn, pl in ((page_store, plane), (reference_page_store, plane_ref)):
        fn(pl, flat, kv)
        fn(pl, flat, k_rot, col_offset=lora)
    assert torch.equal(plane, plane_ref)
    slot, off = int(flat[0]) // page_size, int(flat[0]) % page_size
    assert torch.equal(plane[slot, off, :lora], kv[0])
    assert torch.equal(plane[slot, off, lora:], k_rot[0])
    assert torch.equal(pool[0], _pool(L, S, page_size, (lora + rope,), dtype, device, page_size)[0])


@pytest.mark.parametrize("page_size", [1, 16])
def test_gqa_plane_and_cast(page_size, device):
    S, Hkv, D, T = 8, 3, 24, 7
    plane = torch.zeros(S, page_size, Hkv, D, dtype=torch.bfloat16, device=device)
    plane_ref = plane.clone()
    g = torch.Generator().manual_seed(2)
    flat = torch.randperm(S * page_size, generator=g)[:T].to(device)
    vals = torch.randn(T, Hkv, D, generator=g).to(device)  # fp32 values into a bf16 plane
    page_store(plane, flat, vals)
    reference_page_store(plane_ref, flat, vals)
    assert torch.equal(plane.view(torch.int16), plane_ref.view(torch.int16))


def test_rejects_bad_layout(device):
    plane = torch.zeros(4, 8, 16, device=device)
    with pytest.raises(AssertionError):
        page_store(plane, torch.zeros(2, dtype=torch.int32, device=device), plane[0, :2])
    with pytest.raises(AssertionError):  # too wide for the row
        page_store(plane, torch.zeros(2, dtype=torch.int64, device=device), plane[0, :2], 4)
