"""A 64-bit digest of each page of a plane, identical on CPU and GPU.

The page's raw bytes are read as little-endian 32-bit words ``w[i]`` (i < n words). Two
independent 32-bit lanes each hash every word with its index through a bijective mix, sum the
results modulo 2^32, and mix the sum once more with the word count::

    lane_a = mix_a(sum_i mix_a(w[i] ^ (i * 0x9E3779B9 + 0x7F4A7C15)) ^ n)      (murmur3 fmix32)
    lane_b = mix_b(sum_i mix_b(w[i] ^ (i * 0x85157AF5 + 0x632BE5AB)) ^ n)      (lowbias32)
    digest = int64((lane_a << 32) | lane_b)

Every step is a bijection of one word for fixed i, so any change of a single word (any single
bit flip) changes both lanes; word order matters through i; the sum makes pages parallel to
hash. Not cryptographic. The torch reference runs the same integer math on int64 (products split
in 16-bit halves so nothing overflows) and gives bit-identical digests.
A page's bytes must be a multiple of 4. Legend: n pages, NW words per page.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend

__all__ = ["page_checksum", "reference_page_checksum"]

_MASK32 = 0xFFFFFFFF
_LANE_A = (0x9E3779B9, 0x7F4A7C15, 0x85EBCA6B, 0xC2B2AE35)  # index mul, index add, mix mul 1, 2
_LANE_B = (0x85157AF5, 0x632BE5AB, 0x7FEB352D, 0x846CA68B)


@triton.jit
def _mix_a(h):
    # murmur3 fmix32; h uint32
    h ^= h >> 16
    h *= tl.full((), 0x85EBCA6B, tl.uint32)
    h ^= h >> 13
    h *= tl.full((), 0xC2B2AE35, tl.uint32)
    h ^= h >> 16
    return h


@triton.jit
def _mix_b(h):
    # lowbias32 (C. Wellons); h uint32
    h ^= h >> 16
    h *= tl.full((), 0x7FEB352D, tl.uint32)
    h ^= h >> 15
    h *= tl.full((), 0x846CA68B, tl.uint32)
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["NW"])  # NW stays a runtime int32, even when it is 1
def _kernel(words_ptr, ids_ptr, out_ptr, NW, stride_slot, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(ids_ptr + i).to(tl.int64)
    page = words_ptr + slot * stride_slot
    acc_a = tl.zeros([BLOCK], dtype=tl.uint32)
    acc_b = tl.zeros([BLOCK], dtype=tl.uint32)
    for start in range(0, NW, BLOCK):
        idx = start + tl.arange(0, BLOCK)  # [BLOCK] word index in the page
        mask = idx < NW
        w = tl.load(page + idx, mask=mask, other=0).to(tl.uint32, bitcast=True)
        iu = idx.to(tl.uint32)
        ha = _mix_a(
            w ^ (iu * tl.full((), 0x9E3779B9, tl.uint32) + tl.full((), 0x7F4A7C15, tl.uint32))
        )
        hb = _mix_b(
            w ^ (iu * tl.full((), 0x85157AF5, tl.uint32) + tl.full((), 0x632BE5AB, tl.uint32))
        )
        acc_a += tl.where(mask, ha, tl.zeros_like(ha))
        acc_b += tl.where(mask, hb, tl.zeros_like(hb))
    n = NW.to(tl.uint32)
    lane_a = _mix_a(tl.sum(acc_a, axis=0) ^ n)  # sum wraps mod 2^32
    lane_b = _mix_b(tl.sum(acc_b, axis=0) ^ n)
    tl.store(out_ptr + 2 * i, lane_a.to(tl.int64))  # zero-extended
    tl.store(out_ptr + 2 * i + 1, lane_b.to(tl.int64))


def _words(plane: torch.Tensor) -> torch.Tensor:
    """plane [S, P, ...] -> int32 words [S, NW] (a view, no copy)."""
    assert plane.dim() >= 2, f"plane must be [slots, page_size, ...], got {tuple(plane.shape)}"
    assert plane[0].is_contiguous(), "a plane must be contiguous past the slot dim"
    page_bytes = plane[0].numel() * plane.element_size()
    assert page_bytes % 4 == 0, f"a page must be a multiple of 4 bytes, got {page_bytes}"
    assert (plane.stride(0) * plane.element_size()) % 4 == 0
    flat = plane.reshape(plane.shape[0], -1)  # [S, E] view: rows contiguous
    return flat.view(torch.uint8).view(torch.int32)  # [S, NW] little-endian words


def _ids(slot_ids: torch.Tensor | list[int] | None, plane: torch.Tensor) -> torch.Tensor:
    if slot_ids is None:
        return torch.arange(plane.shape[0], dtype=torch.int64, device=plane.device)
    if isinstance(slot_ids, torch.Tensor):
        assert slot_ids.dim() == 1 and slot_ids.dtype in (torch.int32, torch.int64)
        assert slot_ids.device == plane.device
        return slot_ids
    return torch.tensor(slot_ids, dtype=torch.int64, device=plane.device)


def _combine(lanes: torch.Tensor) -> torch.Tensor:
    """lanes int64 [n, 2] in [0, 2^32) -> int64 [n] = (a << 32) | b, two's complement."""
    return (lanes[:, 0] << 32) | lanes[:, 1]


def page_checksum(
    plane: torch.Tensor, slot_ids: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """Digest int64 [n] of pages plane[slot_ids] (all slots when None)."""
    words = _words(plane)  # [S, NW]
    ids = _ids(slot_ids, plane)
    n, NW = ids.shape[0], words.shape[1]
    lanes = torch.empty((n, 2), dtype=torch.int64, device=plane.device)
    if n > 0:
        block = min(triton.next_power_of_2(max(NW, 1)), 2048)
        backend.launch(
            _kernel, (n,), plane.device, words, ids, lanes, NW, words.stride(0), BLOCK=block
        )
    return _combine(lanes)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 h in [0, 2^32), without int64 overflow."""
    lo = h * (c & 0xFFFF)  # < 2^48
    hi = ((h * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits survive the shift mod 2^32
    return (lo + hi) & _MASK32


def _ref_mix(h: torch.Tensor, lane: tuple[int, int, int, int], shifts: tuple[int, int, int]):
    h = h ^ (h >> shifts[0])
    h = _mul32(h, lane[2])
    h = h ^ (h >> shifts[1])
    h = _mul32(h, lane[3])
    return h ^ (h >> shifts[2])


_SHIFTS_A = (16, 13, 16)
_SHIFTS_B = (16, 15, 16)


def reference_page_checksum(
    plane: torch.Tensor, slot_ids: torch.Tensor | list[int] | None = None
) -> torch.Tensor:
    """Same digest in plain torch integer math (same signature as page_checksum)."""
    words = _words(plane)  # [S, NW]
    ids = _ids(slot_ids, plane)
    w = words.index_select(0, ids.long()).to(torch.int64) & _MASK32  # [n, NW] as uint32
    NW = w.shape[1]
    idx = torch.arange(NW, dtype=torch.int64, device=plane.device)  # [NW]
    lanes = []
    for lane, shifts in ((_LANE_A, _SHIFTS_A), (_LANE_B, _SHIFTS_B)):
        key = (_mul32(idx, lane[0]) + lane[1]) & _MASK32  # [NW]
        h = _ref_mix(w ^ key, lane, shifts)  # [n, NW]
        acc = h.sum(dim=1) & _MASK32  # [n]; NW * 2^32 fits in int64 for pages < 2^31 words
        lanes.append(_ref_mix(acc ^ NW, lane, shifts))
    return _combine(torch.stack(lanes, dim=1))
