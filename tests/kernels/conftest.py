"""Kernel tests: Triton kernels vs their torch references (and the references vs transformers).

Without CUDA the kernels run through Triton's interpreter. ``TRITON_INTERPRET=1`` is set here at
import, before the test modules import triton (kernels.backend.launch also copes with a triton that
was imported earlier without it, as happens when other test directories are collected first).
``KVSCOPE_TRITON_INTERPRET=1`` (kernels.ops dispatching CPU tensors to Triton) is set only while a
test of this directory runs, so other directories keep the torch paths on CPU.
With CUDA the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _kvscope_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_CUDA:
        monkeypatch.setenv("KVSCOPE_TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


class Paged:
    """Dense per-sequence rows laid out in a shuffled page pool, as the runtime's L1 does.

    plane [num_slots, page_size, *row]; page_table int32 [B, max_pages]. Unused slots and the
    unused tail of partly filled pages hold NaN (a kernel that reads them poisons its output);
    unused page_table entries point at such NaN pages.
    """

    def __init__(
        self,
        seqs: list[torch.Tensor],
        page_size: int,
        device: torch.device,
        extra_slots: int = 3,
        max_pages: int | None = None,
        seed: int = 0,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        row = seqs[0].shape[1:]
        dtype = seqs[0].dtype
        pages = [-(-s.shape[0] // page_size) for s in seqs]
        max_pages = max_pages or max(max(pages), 1)
        num_slots = sum(pages) + extra_slots
        perm = torch.randperm(num_slots, generator=g)
        self.plane = torch.full((num_slots, page_size, *row), float("nan"), dtype=dtype)
        junk = perm[sum(pages) :]  # slots never used by a sequence
        self.page_table = junk[torch.randint(0, len(junk), (len(seqs), max_pages), generator=g)]
        used = 0
        for b, s in enumerate(seqs):
            for p in range(pages[b]):
                slot = int(perm[used])
                used += 1
                chunk = s[p * page_size : (p + 1) * page_size]
                self.plane[slot, : chunk.shape[0]] = chunk
                self.page_table[b, p] = slot
        self.plane = self.plane.to(device)
        self.page_table = self.page_table.to(torch.int32).to(device)
        self.seq_lens = torch.tensor([s.shape[0] for s in seqs], dtype=torch.int32, device=device)


@pytest.fixture
def paged():
    return Paged


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose in fp32 (NaN never matches; equal infinities do) with a readable failure."""
    a, e = actual.float(), expected.float()
    assert a.shape == e.shape, (a.shape, e.shape)
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


@pytest.fixture
def close():
    return assert_close
