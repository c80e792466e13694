"""int4 / int8 weights for kvscope's own CPU kernels (kernels/cpu_quant.py: AVX-512 VNNI).

The formats are kvscope's int4 (kernels/int4_moe.py: groups along K, fp16 scale and integer zero
point per group) and int8 (bitsandbytes' per-row absmax bytes), retiled once at load into the
layout the kernels stream; the weights are bit-for-bit the generic dequantization's. What
differs from torch's int4 / int8 kernels (quant_cpu.py, kept where these kernels are
unavailable) is the activations: they are quantized to int8 per block of 32
(``cpu_quant.quantize_activations``), as llama.cpp's Q4_0 / Q8_0 dots do, instead of rounded to
bf16.

``Q4CpuLinear`` / ``Q8CpuLinear`` are one weight; ``Q4CpuStack`` / ``Q8CpuStack`` the routed
experts of one projection, whose ``routed`` runs a whole MoE layer's experts in one call (each
selected expert read once for all its tokens). All are ``graph_safe``: plain attribute tensors
and torch ops only, so the compiled CPU decode step binds their tensors to its inputs
(runtime/models/cpu_graph.py).
"""

from __future__ import annotations

import torch

from kernels import cpu_quant


class _Packed:
    """Shared by the four classes: weight tensors named by FIELDS as plain attributes (what the
    compiled step binds to its inputs), the logical (N, K), and ``group`` (int4; int8: None)."""

    graph_safe = True
    FIELDS: tuple[str, ...] = ()

    def __init__(self, *tensors: torch.Tensor, n: int, k: int, group: int | None = None):
        for name, t in zip(self.FIELDS, tensors, strict=True):
            setattr(self, name, t)
        self.n, self.k, self.group = n, k, group

    def _parts(self, index=None) -> list[torch.Tensor]:
        ts = [getattr(self, f) for f in self.FIELDS]
        return ts if index is None else [t[index] for t in ts]

    @property
    def shape(self) -> tuple[int, int]:  # one weight's (N, K)
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.qw.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._parts())

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.FIELDS, self._parts(), strict=True))


class _Stack(_Packed):
    """E experts of one projection ([E, ...] tensors); ``stack[e]`` is expert e (views)."""

    expert_stack = True  # layers.Experts.packed_stacks()
    LINEAR: type = _Packed

    def __len__(self) -> int:
        return self.qw.shape[0]

    def __getitem__(self, e):
        return self.LINEAR(*self._parts(e), n=self.n, k=self.k, group=self.group)

    @classmethod
    def concat(cls, parts: list):
        """One stack of the experts of several (None if any part is None)."""
        if not parts or any(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        a = parts[0]
        cat = [torch.cat([getattr(p, f) for p in parts]) for f in cls.FIELDS]
        return cls(*cat, n=a.n, k=a.k, group=a.group)


class Q4CpuLinear(_Packed):
    """W [N, K] in Q4 tiles (cpu_quant.Q4Tensors): qw [N16, Kp/8, 64], sc / zp [N16, Kp/G, 16]."""

    FIELDS = ("qw", "sc", "zp")

    @classmethod
    def from_packed(cls, p):
        """From kernels.int4_moe.Int4Packed ([N, ...] for a linear, [E, N, ...] for a stack);
        None when the kernels are unavailable or cannot take the group size."""
        if p.q.dim() != (3 if issubclass(cls, _Stack) else 2) or not cpu_quant.available():
            return None
        t = cpu_quant.from_int4_packed(p)
        return None if t is None else cls(t.qw, t.sc, t.zp, n=t.n, k=t.k, group=t.group)

    @property
    def q4(self) -> cpu_quant.Q4Tensors:
        return cpu_quant.Q4Tensors(self.qw, self.sc, self.zp, self.n, self.k, self.group)

    def dequantize(self) -> torch.Tensor:
        return cpu_quant.unpack(self.q4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_quant.linear(x, self.q4)


class Q4CpuStack(_Stack):
    """E int4 experts of one projection: qw [E, N16, Kp/8, 64], sc / zp [E, N16, Kp/G, 16]."""

    FIELDS = Q4CpuLinear.FIELDS
    LINEAR = Q4CpuLinear
    from_packed = Q4CpuLinear.__dict__["from_packed"]
    q4 = Q4CpuLinear.q4

    def routed(self, down: Q4CpuStack, x, weights, ids) -> torch.Tensor:
        """The MoE layer's routed experts with self as gate_up [E] x [2I, D] and ``down`` [E] x
        [D, I]: x [T, D], weights / ids [T, K] -> [T, D] in x's dtype (one kernel call, the
        experts summed in fp32)."""
        return cpu_quant.moe(x, ids, weights, self.q4, down.q4, self.n // 2)


class Q8CpuLinear(_Packed):
    """W [N, K] = int8 q * per-row scale, in Q8 tiles (cpu_quant.Q8Tensors): qw [N16, Kp/4, 64],
    rs [N16, 16]."""

    FIELDS = ("qw", "rs")

    @classmethod
    def of(cls, q: torch.Tensor, scale: torch.Tensor, k: int | None = None):
        """From int8 q [(E,) N, >= K] and scales [(E,) N] (W = q * scale); None when the kernels
        are unavailable."""
        if not cpu_quant.available():
            return None
        t = cpu_quant.pack8(q, scale, q.shape[-1] if k is None else k)
        return cls(t.qw, t.rs, n=t.n, k=t.k)

    @property
    def q8(self) -> cpu_quant.Q8Tensors:
        return cpu_quant.Q8Tensors(self.qw, self.rs, self.n, self.k)

    def dequantize(self) -> torch.Tensor:
        return cpu_quant.unpack8(self.q8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_quant.linear8(x, self.q8)


class Q8CpuStack(_Stack):
    """E int8 experts of one projection: qw [E, N16, Kp/4, 64], rs [E, N16, 16]."""

    FIELDS = Q8CpuLinear.FIELDS
    LINEAR = Q8CpuLinear
    of = Q8CpuLinear.__dict__["of"]
    q8 = Q8CpuLinear.q8

    def routed(self, down: Q8CpuStack, x, weights, ids) -> torch.Tensor:
        """As Q4CpuStack.routed, over int8 stacks."""
        return cpu_quant.moe8(x, ids, weights, self.q8, down.q8, self.n // 2)


__all__ = ["Q4CpuLinear", "Q4CpuStack", "Q8CpuLinear", "Q8CpuStack"]
