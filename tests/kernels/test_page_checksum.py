"""page_checksum: Triton digests are bit-identical to the torch reference, change on every
single bit flip, depend on word order, not on the slot a page sits in. Exact comparisons."""

import pytest
import torch

from kernels.page_checksum import page_checksum, reference_page_checksum


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((5, 16, 56), torch.bfloat16),
        ((3, 1, 1), torch.float32),
        ((4, 3, 7, 2), torch.float16),
        ((2, 64, 3, 40), torch.bfloat16),
    ],
)
def test_matches_reference(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, *shape, generator=g).to(dtype).to(device)
    plane = pool[1]
    d = page_checksum(plane)
    assert d.dtype == torch.int64 and d.shape == (shape[0],)
    assert torch.equal(d, reference_page_checksum(plane))
    ids = torch.tensor([shape[0] - 1, 0], dtype=torch.int32, device=device)
    assert torch.equal(page_checksum(plane, ids), d[ids.long()])
    assert torch.equal(page_checksum(plane, [0]), d[:1])


def test_known_value(device):
    """Pinned digests (computed with plain Python ints from the formula in the module doc): a
    change to the hash, whose values may be stored, must be deliberate."""
    plane = torch.arange(2 * 4 * 8, dtype=torch.int32).view(2, 4, 8)
    expected = [5764822871696526938, -6006390261081834776]
    assert reference_page_checksum(plane).tolist() == expected
    assert page_checksum(plane.to(device)).tolist() == expected


def test_every_single_bit_flip_changes_digest(device):
    g = torch.Generator().manual_seed(1)
    plane = torch.randint(-(2**31), 2**31 - 1, (1, 2, 4), generator=g, dtype=torch.int32)
    base = int(reference_page_checksum(plane)[0])
    base_lanes = (base >> 32) & 0xFFFFFFFF, base & 0xFFFFFFFF
    flipped = plane.repeat(8 * 32, 1, 1).view(8 * 32, 8)  # one copy per (word, bit)
    word = torch.arange(8 * 32) // 32
    bit = torch.arange(8 * 32) % 32
    masks = torch.where(bit == 31, -(2**31), 1 << bit.clamp(max=30)).to(torch.int32)
    flipped[torch.arange(8 * 32), word] ^= masks
    digests = reference_page_checksum(flipped.view(8 * 32, 2, 4))
    assert ((digests >> 32) & 0xFFFFFFFF != base_lanes[0]).all()  # both lanes change
    assert (digests & 0xFFFFFFFF != base_lanes[1]).all()
    sample = flipped.view(8 * 32, 2, 4)[::37].to(device)  # a few through the kernel
    assert torch.equal(page_checksum(sample).cpu(), digests[::37])


def test_order_and_location(device):
    g = torch.Generator().manual_seed(2)
    page = torch.randn(1, 16, 24, generator=g).to(device)
    swapped = page.clone()
    swapped[0, [0, 1]] = page[0, [1, 0]]  # two token rows swapped
    moved = torch.cat([torch.zeros_like(page), page])  # same page in slot 1
    d = page_checksum(torch.cat([page, swapped, moved]))
    assert d[0] != d[1]
    assert d[0] == d[3] and d[2] != d[0]
