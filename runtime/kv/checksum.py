"""Page checksums: a 64-bit digest per page plane, the same on every tier and device.

`page_digest(t)` hashes the raw bytes of one page of one plane (any dtype, any shape, contiguous)
with the algorithm of `kernels/page_checksum.py` (two 32-bit lanes, murmur3 fmix32 and lowbias32,
each word mixed with its index, summed mod 2^32, mixed with the word count), so this torch version
and the Triton kernel give bit-identical digests. Any single bit flip changes the digest (every
step is a bijection of one word); word order matters. Not cryptographic.

A page spans all layers and the pool stores planes as `[num_layers, num_slots, page_size, *tail]`,
so one page of a plane is `num_layers` separate rows. The checksum of a page plane is therefore
two-level: `layer_digests` (one digest per layer, what the Triton kernel computes for a batch of
slots) folded by `fold_digests` (the same digest over the int64 bytes of the layer digests).
`page_checksums` returns that fold per plane: the value an L1 page record, an L2 slot and an L3
file header carry (ARCHITECTURE invariant 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["page_digest", "layer_digests", "fold_digests", "page_checksums"]

_MASK32 = 0xFFFFFFFF
# (index mul, index add, mix mul 1, mix mul 2), shifts; identical to kernels/page_checksum.py
_LANES = (
    ((0x9E3779B9, 0x7F4A7C15, 0x85EBCA6B, 0xC2B2AE35), (16, 13, 16)),  # murmur3 fmix32
    ((0x85157AF5, 0x632BE5AB, 0x7FEB352D, 0x846CA68B), (16, 15, 16)),  # lowbias32
)


# The hashing runs on int32 words holding the uint32 values' bits: multiply and xor give the
# same low 32 bits as on uint32 (two's complement wraps), a right shift is made logical with a
# mask, and the sum is taken in int64 and reduced mod 2^32. About 4x fewer ops than emulating
# uint32 in int64 (what kernels/page_checksum.py's reference does); bit-identical.


def _i32(c: int) -> int:
    """The int32 with the bits of the uint32 constant c."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _srl(h: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 words (as uint32)."""
    return (h >> s) & ((1 << (32 - s)) - 1)


def _mix(h: torch.Tensor, mul: tuple[int, int], shifts: tuple[int, int, int]) -> torch.Tensor:
    """fmix32-style finaliser on int32 words."""
    h = h ^ _srl(h, shifts[0])
    h = h * _i32(mul[0])
    h = h ^ _srl(h, shifts[1])
    h = h * _i32(mul[1])
    return h ^ _srl(h, shifts[2])


def _words(t: torch.Tensor) -> torch.Tensor:
    """Rows of raw bytes [n, B] -> int32 [n, NW] little-endian words (zero padded)."""
    nbytes = t.shape[1]
    if nbytes % 4:
        t = torch.nn.functional.pad(t, (0, 4 - nbytes % 4))
    return t.contiguous().view(torch.int32)


def _digest_rows(rows: torch.Tensor) -> torch.Tensor:
    """uint8 [n, B] -> int64 [n] digests (two's complement of the 64-bit value)."""
    w = _words(rows)  # [n, NW]
    nw = w.shape[1]
    idx = torch.arange(nw, dtype=torch.int32, device=w.device)  # [NW]
    lanes = []
    for (imul, iadd, m1, m2), shifts in _LANES:
        key = idx * _i32(imul) + _i32(iadd)  # [NW], wraps mod 2^32
        h = _mix(w ^ key, (m1, m2), shifts)  # [n, NW]
        acc = (h.sum(dim=1, dtype=torch.int64) & _MASK32).to(torch.int32)  # [n] sum mod 2^32
        lane = _mix(acc ^ _i32(nw & _MASK32), (m1, m2), shifts)
        lanes.append(lane.to(torch.int64) & _MASK32)
    return (lanes[0] << 32) | lanes[1]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    assert t.is_contiguous(), "page_digest needs a contiguous tensor (one page of one plane)"
    return t.reshape(-1).view(torch.uint8)


def _to_u64(x: int) -> int:
    return x & 0xFFFFFFFFFFFFFFFF


def page_digest(t: torch.Tensor) -> int:
    """Digest (unsigned 64-bit int) of the raw bytes of `t`, one page of one plane. Pure."""
    return _to_u64(int(_digest_rows(_as_bytes(t).unsqueeze(0))[0]))


def layer_digests(plane: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
    """plane [L, S, P, *tail], n slots -> int64 [n, L]: digest of each page's row in each layer.

    On CUDA the Triton kernel computes it when importable (same values); elsewhere plain torch.
    Pure (reads only). The caller orders this after every write into the slots (fences).
    """
    num_layers = plane.shape[0]
    ids = torch.tensor(list(slots), dtype=torch.int64, device=plane.device)  # [n]
    if plane.is_cuda:
        try:
            from kernels.page_checksum import page_checksum
        except ImportError:  # pragma: no cover - triton missing on a CUDA box
            page_checksum = None
        if page_checksum is not None:
            cols = [page_checksum(plane[layer], ids) for layer in range(num_layers)]  # L x [n]
            return torch.stack(cols, dim=1)
    rows = plane.index_select(1, ids)  # [L, n, P, *tail]
    rows = rows.transpose(0, 1).reshape(len(ids) * num_layers, -1)  # [n*L, E]
    rows = rows.contiguous().view(torch.uint8)  # [n*L, E*elsize]
    return _digest_rows(rows).view(len(ids), num_layers)


def fold_digests(per_layer: torch.Tensor) -> list[int]:
    """int64 [n, L] layer digests -> n page-plane checksums (digest of the L int64 words)."""
    rows = per_layer.contiguous().view(torch.uint8)  # [n, 8L]
    return [_to_u64(int(x)) for x in _digest_rows(rows).cpu()]


def page_checksums(
    planes: Mapping[str, torch.Tensor], slots: Sequence[int]
) -> list[dict[str, int]]:
    """Checksum of every plane of each page in `slots` (planes [L, S, P, *tail]). Pure.

    Returns one dict plane name -> 64-bit checksum per slot, in slot order; {} per slot when
    `planes` is empty (the int-only tests run the tier logic without tensors).
    """
    out: list[dict[str, int]] = [{} for _ in slots]
    if not slots:
        return out
    for name, plane in planes.items():
        for i, value in enumerate(fold_digests(layer_digests(plane, slots))):
            out[i][name] = value
    return out
