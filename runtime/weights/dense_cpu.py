"""bf16 linear weights prepacked for oneDNN on the CPU (issue 17).

``F.linear`` on a bf16 weight lets oneDNN reorder the weight into its blocked layout on every
call; at decode (a few rows against a large weight) that reorder costs as much as the product.
``torch.ops.mkldnn._reorder_linear_weight`` does it once at load (an opaque ``torch._mkldnn``
tensor of the same size) and ``torch.ops.mkldnn._linear_pointwise`` streams it: 1.5-3x the
GEMV throughput of F.linear at 1-8 rows here (Xeon, AVX-512 BF16), bit-identical results
(tests/runtime/weights/test_dense_cpu.py; figures in docs/performance.md).

Used only where oneDNN has bf16 kernels for this CPU (``available()``: torch built with mkldnn
and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX-512 or AMX; never assumed), and only
for models that decode eagerly: the packed tensor cannot be an input of the AOTInductor-compiled
CPU decode step (Inductor accepts oneDNN-packed weights only as frozen constants), so a model
small enough to be frozen (runtime/models/cpu_graph.py, FROZEN_MAX_BYTES; Inductor prepacks it
itself) keeps plain tensors, and a packed model decodes eagerly (measured faster than the
compiled step over plain weights: docs/performance.md). The plain weight is not kept.
"""

from __future__ import annotations

import functools
import os

import torch

# Models whose linear weights total more than this are packed (see the module doc); the same
# bound as cpu_graph.FROZEN_MAX_BYTES, read from the same variable.
PACK_MIN_BYTES = int(os.environ.get("KVSCOPE_CPU_GRAPH_FROZEN_MAX", 256 << 20))


@functools.cache
def available() -> bool:
    """oneDNN bf16 linear kernels on this CPU (KVSCOPE_ONEDNN_PACK=0 turns packing off)."""
    if os.environ.get("KVSCOPE_ONEDNN_PACK", "1") == "0":
        return False
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


class OnednnBf16Linear:
    """W [N, K] bf16, packed once for oneDNN; called as w(x) -> x @ W.T in x's dtype."""

    def __init__(self, w: torch.Tensor):
        assert w.dtype == torch.bfloat16 and w.dim() == 2 and w.device.type == "cpu"
        self.n, self.k = w.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return self.n * self.k * 2

    def dequantize(self) -> torch.Tensor:
        """W [N, K] bf16 (a plain copy, for reference paths and tests)."""
        return self.packed.to_dense()

    takes_bias = True  # linear() passes the bias in: added before the one rounding to bf16

    def __call__(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, self.k).to(torch.bfloat16)
        b = None if b is None else b.to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, b, "none", [], "")
        return y.to(x.dtype).view(*x.shape[:-1], self.n)


def pack(w: torch.Tensor) -> OnednnBf16Linear:
    return OnednnBf16Linear(w)


__all__ = ["OnednnBf16Linear", "PACK_MIN_BYTES", "available", "pack"]
