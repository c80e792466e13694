"""int4 weights for kvscope's own CPU kernels (kernels/cpu_q4.py: 4-bit x int8, AVX-512 VNNI).

The format is kvscope's int4 (kernels/int4_moe.py: groups along K, fp16 scale and integer zero
point per group), retiled once at load into the layout the kernel streams; the weight is
bit-for-bit the generic dequantization's. What differs from torch's int4 kernel
(quant_cpu.Int4CpuLinear, kept where these kernels are unavailable) is the activations: they
are quantized to int8 per block of 32 (``cpu_q4.quantize_activations``), as llama.cpp's Q4_0 /
Q8_0 dots do, instead of rounded to bf16.

``Q4CpuLinear`` is one weight; ``Q4CpuStack`` the routed experts of one projection, whose
``routed`` runs a whole MoE layer's experts in one call (each selected expert read once for
all its tokens). Both are ``graph_safe``: plain attribute tensors and torch ops only, so the
compiled CPU decode step binds their tensors to its inputs (runtime/models/cpu_graph.py).
"""

from __future__ import annotations

import torch

from kernels import cpu_q4


class Q4CpuLinear:
    """W [N, K] in Q4 tiles (cpu_q4.Q4Tensors)."""

    graph_safe = True

    def __init__(self, qw: torch.Tensor, sc: torch.Tensor, zp: torch.Tensor, n: int, k: int, g):
        self.qw, self.sc, self.zp = qw, sc, zp
        self.n, self.k, self.group = n, k, g

    @classmethod
    def from_packed(cls, p) -> Q4CpuLinear | None:
        """From kernels.int4_moe.Int4Packed [N, ...]; None when the kernels cannot take it."""
        if p.q.dim() != 2 or not cpu_q4.available():
            return None
        t = cpu_q4.from_int4_packed(p)
        return None if t is None else cls(t.qw, t.sc, t.zp, t.n, t.k, t.group)

    @property
    def q4(self) -> cpu_q4.Q4Tensors:
        return cpu_q4.Q4Tensors(self.qw, self.sc, self.zp, self.n, self.k, self.group)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.qw.device

    @property
    def nbytes(self) -> int:
        return self.qw.numel() + self.sc.numel() * 2 + self.zp.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qw": self.qw, "sc": self.sc, "zp": self.zp}

    def dequantize(self) -> torch.Tensor:
        return cpu_q4.unpack(self.q4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_q4.linear(x, self.q4)


class Q4CpuStack:
    """E experts of one projection: qw [E, N16, Kp/8, 64], sc / zp [E, N16, Kp/G, 16]."""

    graph_safe = True
    expert_stack = True  # layers.Experts.packed_stacks()

    def __init__(self, qw, sc, zp, n: int, k: int, g: int):
        self.qw, self.sc, self.zp = qw, sc, zp
        self.n, self.k, self.group = n, k, g

    @classmethod
    def from_packed(cls, p) -> Q4CpuStack | None:
        """From a stacked kernels.int4_moe.Int4Packed [E, N, ...]; None when unavailable."""
        if p.q.dim() != 3 or not cpu_q4.available():
            return None
        t = cpu_q4.from_int4_packed(p)
        return None if t is None else cls(t.qw, t.sc, t.zp, t.n, t.k, t.group)

    @property
    def q4(self) -> cpu_q4.Q4Tensors:
        return cpu_q4.Q4Tensors(self.qw, self.sc, self.zp, self.n, self.k, self.group)

    def __len__(self) -> int:
        return self.qw.shape[0]

    def __getitem__(self, e) -> Q4CpuLinear:
        return Q4CpuLinear(self.qw[e], self.sc[e], self.zp[e], self.n, self.k, self.group)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.qw.numel() + self.sc.numel() * 2 + self.zp.numel()

    def routed(self, down: Q4CpuStack, x, weights, ids) -> torch.Tensor:
        """The MoE layer's routed experts with self as gate_up [E] x [2I, D] and ``down`` [E] x
        [D, I]: x [T, D], weights / ids [T, K] -> [T, D] in x's dtype (one kernel call, the
        experts summed in fp32)."""
        return cpu_q4.moe(x, ids, weights, self.q4, down.q4, self.n // 2)


__all__ = ["Q4CpuLinear", "Q4CpuStack"]
