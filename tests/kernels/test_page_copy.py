"""page_gather / page_scatter: Triton vs reference, bit-exact (compared as raw integers)."""

import pytest
import torch

from kernels.page_copy import page_gather, page_scatter, reference_page_gather


@pytest.mark.parametrize(
    "shape,dtype",
    [((6, 16, 56), torch.bfloat16), ((5, 1, 40), torch.float32), ((4, 64, 3, 24), torch.float16)],
)
def test_gather_scatter_roundtrip(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(2, *shape, generator=g).to(dtype).to(device)
    pool[1, 0, 0, 0] = float("nan")
    plane = pool[1]  # per-layer view
    ids = [3, 0, 1] if shape[0] > 3 else [2, 0]
    buf = page_gather(plane, ids)
    assert buf.is_contiguous() and buf.shape == (len(ids), *shape[1:])
    ref = reference_page_gather(plane, torch.tensor(ids, device=device))
    assert torch.equal(
        buf.view(torch.int16 if dtype != torch.float32 else torch.int32),
        ref.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
    # scatter into other slots, then gather back
    dst = torch.arange(shape[0] - 1, shape[0] - 1 - len(ids), -1, dtype=torch.int32, device=device)
    before = plane.clone()
    page_scatter(plane, dst, buf)
    again = page_gather(plane, dst)
    assert torch.equal(again.view(torch.uint8), buf.view(torch.uint8))
    untouched = [s for s in range(shape[0]) if s not in dst.tolist()]
    assert torch.equal(plane[untouched].view(torch.uint8), before[untouched].view(torch.uint8))
    assert torch.equal(pool[0].view(torch.uint8), pool[0].clone().view(torch.uint8))


def test_gather_into_out_buffer(device):
    plane = torch.arange(5 * 4 * 8, dtype=torch.float32, device=device).view(5, 4, 8)
    out = torch.empty(2, 4, 8, device=device)
    assert page_gather(plane, torch.tensor([4, 2], device=device), out=out) is out
    assert torch.equal(out, plane[[4, 2]])
