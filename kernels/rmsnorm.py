"""RMSNorm with an optional fused residual add.

Matches transformers' ``GlmMoeDsaRMSNorm`` / ``Glm4MoeRMSNorm``::

    h = x.float(); h = h * rsqrt(mean(h^2) + eps); out = weight * h.to(x.dtype)

With ``residual`` the input is first ``x + residual`` rounded to x's dtype (the decoder layer's
``hidden_states = residual + hidden_states``), and that sum is returned as the new residual.
Legend: N rows (tokens), D hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import backend
from kernels._tl import cast_rne

__all__ = ["rmsnorm", "reference_rmsnorm"]


@triton.jit
def _kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    D,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = cast_rne(x.to(tl.float32) + r.to(tl.float32), x.dtype)  # rounded like torch's add
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / D
    h = h * (1.0 / tl.sqrt(var + eps))
    h = cast_rne(h, x.dtype).to(tl.float32)  # transformers rounds to x's dtype before * w
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out + cols, cast_rne(w * h, out_ptr.dtype.element_ty), mask=mask
    )


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    assert x.dim() >= 1 and x.shape[-1] > 0, x.shape
    assert weight.shape == (x.shape[-1],), (weight.shape, x.shape)
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    assert weight.device == x.device
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, x.shape)
        assert residual.device == x.device


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View [..., D] as [N, D] with a unit last stride (copies only if it cannot be viewed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RMSNorm. x [..., D], weight [D], residual like x or None.

    Returns ``(normed, new_residual)``: normed [..., D] in promote(x, weight) dtype;
    new_residual = x + residual (x's dtype), or x itself when residual is None.
    """
    _check(x, weight, residual)
    D = x.shape[-1]
    x2 = _rows(x)  # [N, D]
    n = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty((n, D), dtype=out_dtype, device=x.device)
    if residual is not None:
        r2 = _rows(residual)  # [N, D]
        res_out = torch.empty((n, D), dtype=x.dtype, device=x.device)
    else:
        r2, res_out = x2, x2  # unused by the kernel
    if n > 0:
        block_d = triton.next_power_of_2(D)
        backend.launch(
            _kernel,
            (n,),
            x.device,
            x2,
            r2,
            weight,
            out,
            res_out,
            D,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            float(eps),
            HAS_RESIDUAL=residual is not None,
            BLOCK_D=block_d,
            num_warps=min(max(block_d // 256, 1), 16),
        )
    new_residual = res_out.view(x.shape) if residual is not None else x
    return out.view(x.shape), new_residual


def reference_rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, the exact op order of transformers' RMSNorm (same signature as rmsnorm)."""
    _check(x, weight, residual)
    if residual is not None:
        x = x + residual
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype), x
