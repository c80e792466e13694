"""Move whole pages between a plane and a contiguous buffer (tier copies L1 <-> L2).

``page_gather(plane, slot_ids)`` -> ``buf [n, page_size, *row]``, ``buf[i] = plane[slot_ids[i]]``
``page_scatter(plane, slot_ids, buf)`` writes ``plane[slot_ids[i]] = buf[i]`` in place.
Copies are bit-exact (same dtype, no conversion). The buffer is a device tensor; moving it to host
memory is a plain ``.to(..., non_blocking=True)`` by the caller. Legend: n pages, E elements/page.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend

__all__ = ["page_gather", "page_scatter", "reference_page_gather", "reference_page_scatter"]


@triton.jit
def _kernel(
    plane_ptr,
    buf_ptr,
    ids_ptr,
    E,
    stride_slot,
    SCATTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] within a page
    mask = offs < E
    slot = tl.load(ids_ptr + i).to(tl.int64)
    page = plane_ptr + slot * stride_slot + offs
    buf = buf_ptr + i * E + offs
    if SCATTER:
        tl.store(page, tl.load(buf, mask=mask), mask=mask)
    else:
        tl.store(buf, tl.load(page, mask=mask), mask=mask)


def _check(plane: torch.Tensor, slot_ids: torch.Tensor) -> None:
    assert plane.dim() >= 2, f"plane must be [slots, page_size, ...], got {tuple(plane.shape)}"
    assert plane[0].is_contiguous(), "a plane must be contiguous past the slot dim"
    assert slot_ids.dim() == 1 and slot_ids.dtype in (torch.int32, torch.int64), slot_ids.dtype
    assert slot_ids.device == plane.device


def _ids(slot_ids: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    if isinstance(slot_ids, torch.Tensor):
        return slot_ids
    return torch.tensor(slot_ids, dtype=torch.int64, device=device)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _copy(plane: torch.Tensor, ids: torch.Tensor, buf: torch.Tensor, scatter: bool) -> None:
    # Copy raw bits (an integer view of the same width), so NaN payloads etc. survive.
    int_dtype = _INT_OF_SIZE[plane.element_size()]
    plane, buf = plane.view(int_dtype), buf.view(int_dtype)
    n = ids.shape[0]
    E = plane[0].numel()
    if n == 0 or E == 0:
        return
    block = min(triton.next_power_of_2(E), 4096)
    backend.launch(
        _kernel,
        (n, triton.cdiv(E, block)),
        plane.device,
        plane,
        buf,
        ids,
        E,
        plane.stride(0),
        SCATTER=scatter,
        BLOCK=block,
    )


def page_gather(
    plane: torch.Tensor,
    slot_ids: torch.Tensor | list[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy pages plane[slot_ids] (ids int32/int64 [n] or a list) into out [n, *plane.shape[1:]]
    (allocated when None; must be contiguous and of plane's dtype). Returns out."""
    ids = _ids(slot_ids, plane.device)
    _check(plane, ids)
    shape = (ids.shape[0], *plane.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=plane.dtype, device=plane.device)
    assert out.shape == shape and out.dtype == plane.dtype and out.is_contiguous(), out.shape
    assert out.device == plane.device
    _copy(plane, ids, out, scatter=False)
    return out


def page_scatter(
    plane: torch.Tensor,
    slot_ids: torch.Tensor | list[int],
    src: torch.Tensor,
) -> None:
    """Copy src [n, *plane.shape[1:]] (contiguous, plane's dtype) into plane[slot_ids], in place."""
    ids = _ids(slot_ids, plane.device)
    _check(plane, ids)
    assert src.shape == (ids.shape[0], *plane.shape[1:]), (src.shape, plane.shape)
    assert src.dtype == plane.dtype and src.is_contiguous() and src.device == plane.device
    _copy(plane, ids, src, scatter=True)


def reference_page_gather(
    plane: torch.Tensor,
    slot_ids: torch.Tensor | list[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch index_select (same signature as page_gather)."""
    ids = _ids(slot_ids, plane.device)
    _check(plane, ids)
    pages = plane.index_select(0, ids.long())
    if out is None:
        return pages
    out.copy_(pages)
    return out


def reference_page_scatter(
    plane: torch.Tensor,
    slot_ids: torch.Tensor | list[int],
    src: torch.Tensor,
) -> None:
    """Plain torch index_copy_ (same signature as page_scatter)."""
    ids = _ids(slot_ids, plane.device)
    _check(plane, ids)
    plane.index_copy_(0, ids.long(), src)
