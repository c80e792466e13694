"""Write new tokens' KV rows into the paged L1 pool.

A plane is ``[num_slots, page_size, *row]`` (contiguous past dim 0; e.g. MLA latent
``[S, P, kv_lora + rope]``, GQA K ``[S, P, Hkv, Dh]``). Token ``t`` goes to flat row
``slot_mapping[t] = slot * page_size + offset``; negative entries are skipped (padding rows).
``col_offset`` writes a narrower ``values`` into columns ``[col_offset, col_offset + w)`` of the
row, so the MLA latent (kv_lora) and k_rot (rope) halves can be stored without a concat.
Values are cast to the plane's dtype. Legend: T tokens, W row width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels._tl import cast_rne

__all__ = ["page_store", "reference_page_store"]


@triton.jit
def _kernel(
    plane_ptr,
    val_ptr,
    map_ptr,
    w,
    stride_slot,
    stride_off,
    page_size,
    col_offset,
    stride_vt,
    BLOCK_W: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    flat = tl.load(map_ptr + t).to(tl.int64)  # slot * page_size + offset, < 0 = skip
    if flat < 0:  # (early return: the interpreter mishandles scalar-bool & vector-bool masks)
        return
    slot = flat // page_size
    off = flat % page_size
    mask = cols < w
    v = tl.load(val_ptr + t * stride_vt + cols, mask=mask, other=0.0)
    dst = plane_ptr + slot * stride_slot + off * stride_off + col_offset + cols
    tl.store(dst, cast_rne(v, plane_ptr.dtype.element_ty), mask=mask)


def _check(
    plane: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor, col_offset: int
) -> tuple[torch.Tensor, int]:
    """Returns values viewed as [T, w] and the plane's row width W."""
    assert plane.dim() >= 3, f"plane must be [slots, page_size, ...], got {tuple(plane.shape)}"
    row_shape = plane.shape[2:]
    W = row_shape.numel()
    assert plane[0].is_contiguous(), "a plane must be contiguous past the slot dim"
    assert slot_mapping.dim() == 1 and slot_mapping.dtype == torch.int64, slot_mapping.dtype
    assert values.shape[0] == slot_mapping.shape[0], (values.shape, slot_mapping.shape)
    assert slot_mapping.device == plane.device and values.device == plane.device
    if plane.dim() > 3:
        assert values.shape[1:] == row_shape and col_offset == 0, (values.shape, row_shape)
    else:
        assert values.dim() == 2, values.shape
    v2 = values.reshape(values.shape[0], -1)  # [T, w]
    assert v2.stride(-1) == 1 or v2.shape[1] == 1, "values need a unit last stride"
    assert 0 <= col_offset and col_offset + v2.shape[1] <= W, (col_offset, v2.shape, W)
    return v2, W


def page_store(
    plane: torch.Tensor,
    slot_mapping: torch.Tensor,
    values: torch.Tensor,
    col_offset: int = 0,
) -> None:
    """Write values [T, w] (or [T, *row] for 4-D planes) into plane at slot_mapping int64 [T].

    In place; entries of slot_mapping < 0 are skipped.
    """
    v2, _ = _check(plane, slot_mapping, values, col_offset)
    T, w = v2.shape
    if T == 0 or w == 0:
        return
    block_w = min(triton.next_power_of_2(w), 1024)
    backend.launch(
        _kernel,
        (T, triton.cdiv(w, block_w)),
        plane.device,
        plane,
        v2,
        slot_mapping,
        w,
        plane.stride(0),
        plane.stride(1),
        plane.shape[1],
        col_offset,
        v2.stride(0),
        BLOCK_W=block_w,
    )


def reference_page_store(
    plane: torch.Tensor,
    slot_mapping: torch.Tensor,
    values: torch.Tensor,
    col_offset: int = 0,
) -> None:
    """Plain torch index_copy into the flattened plane (same signature as page_store)."""
    v2, W = _check(plane, slot_mapping, values, col_offset)
    keep = slot_mapping >= 0
    flat = slot_mapping[keep]  # [T'] flat rows
    page_size = plane.shape[1]
    rows = plane[flat // page_size, flat % page_size].reshape(flat.shape[0], W)  # [T', W] copy
    rows[:, col_offset : col_offset + v2.shape[1]] = v2[keep].to(plane.dtype)
    plane[flat // page_size, flat % page_size] = rows.view((flat.shape[0], *plane.shape[2:]))
