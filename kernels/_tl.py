"""Small Triton helpers shared by the kernels (device functions only, no launches)."""

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """x -> dtype with round-to-nearest-even, also under Triton's interpreter.

    The interpreter (triton 3.9) truncates fp32 -> bf16 casts where the GPU rounds to nearest
    even, so fp32 -> bf16 is done on the bits here (NaN kept as NaN); identical on the GPU.
    """
    if dtype == tl.bfloat16:
        if x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the low 16 bits
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            return tl.where(x != x, x.to(tl.bfloat16), y)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)
