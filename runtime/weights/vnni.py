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


class Q4CpuLinear:
    """W [N, K] in Q4 tiles (cpu_quant.Q4Tensors)."""

    graph_safe = True

    def __init__(self, qw: torch.Tensor, sc: torch.Tensor, zp: torch.Tensor, n: int, k: int, g):
        self.qw, self.sc, self.zp = qw, sc, zp
        self.n, self.k, self.group = n, k, g

    @classmethod
    def from_packed(cls, p) -> Q4CpuLinear | None:
        """From kernels.int4_moe.Int4Packed [N, ...]; None when the kernels cannot take it."""
        if p.q.dim() != 2 or not cpu_quant.available():
            return None
        t = cpu_quant.from_int4_packed(p)
        return None if t is None else cls(t.qw, t.sc, t.zp, t.n, t.k, t.group)

    @property
    def q4(self) -> cpu_quant.Q4Tensors:
        return cpu_quant.Q4Tensors(self.qw, self.sc, self.zp, self.n, self.k, self.group)

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
        return cpu_quant.unpack(self.q4)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_quant.linear(x, self.q4)


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
        if p.q.dim() != 3 or not cpu_quant.available():
            return None
        t = cpu_quant.from_int4_packed(p)
        return None if t is None else cls(t.qw, t.sc, t.zp, t.n, t.k, t.group)

    @classmethod
    def concat(cls, parts: list) -> Q4CpuStack | None:
        """One stack of the experts of several (None if any part is None)."""
        if not parts or any(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        a = parts[0]
        return cls(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("qw", "sc", "zp")),
            a.n,
            a.k,
            a.group,
        )

    @property
    def q4(self) -> cpu_quant.Q4Tensors:
        return cpu_quant.Q4Tensors(self.qw, self.sc, self.zp, self.n, self.k, self.group)

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
        return cpu_quant.moe(x, ids, weights, self.q4, down.q4, self.n // 2)


class Q8CpuLinear:
    """W [N, K] = int8 q * per-row scale, in Q8 tiles (cpu_quant.Q8Tensors)."""

    graph_safe = True

    def __init__(self, qw: torch.Tensor, rs: torch.Tensor, n: int, k: int):
        self.qw, self.rs, self.n, self.k = qw, rs, n, k

    @classmethod
    def of(cls, q: torch.Tensor, scale: torch.Tensor, k: int | None = None) -> Q8CpuLinear | None:
        """From int8 q [N, >= K] and scale [N] (W = q * scale); None when unavailable."""
        if not cpu_quant.available():
            return None
        t = cpu_quant.pack8(q, scale, q.shape[-1] if k is None else k)
        return cls(t.qw, t.rs, t.n, t.k)

    @property
    def q8(self) -> cpu_quant.Q8Tensors:
        return cpu_quant.Q8Tensors(self.qw, self.rs, self.n, self.k)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.qw.device

    @property
    def nbytes(self) -> int:
        return self.qw.numel() + self.rs.numel() * 4

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qw": self.qw, "rs": self.rs}

    def dequantize(self) -> torch.Tensor:
        return cpu_quant.unpack8(self.q8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_quant.linear8(x, self.q8)


class Q8CpuStack:
    """E int8 experts of one projection: qw [E, N16, Kp/4, 64], rs [E, N16, 16]."""

    graph_safe = True
    expert_stack = True

    def __init__(self, qw, rs, n: int, k: int):
        self.qw, self.rs, self.n, self.k = qw, rs, n, k

    @classmethod
    def of(cls, q: torch.Tensor, scale: torch.Tensor) -> Q8CpuStack | None:
        """From int8 q [E, N, K] and scales [E, N]; None when unavailable."""
        if not cpu_quant.available():
            return None
        t = cpu_quant.pack8(q, scale, q.shape[-1])
        return cls(t.qw, t.rs, t.n, t.k)

    @classmethod
    def concat(cls, parts: list) -> Q8CpuStack | None:
        """One stack of the experts of several (None if any part is None)."""
        if not parts or any(p is None for p in parts):
            return None
        if len(parts) == 1:
            return parts[0]
        qw, rs = (torch.cat([getattr(p, f) for p in parts]) for f in ("qw", "rs"))
        return cls(qw, rs, parts[0].n, parts[0].k)

    @property
    def q8(self) -> cpu_quant.Q8Tensors:
        return cpu_quant.Q8Tensors(self.qw, self.rs, self.n, self.k)

    def __len__(self) -> int:
        return self.qw.shape[0]

    def __getitem__(self, e) -> Q8CpuLinear:
        return Q8CpuLinear(self.qw[e], self.rs[e], self.n, self.k)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.qw.numel() + self.rs.numel() * 4

    def routed(self, down: Q8CpuStack, x, weights, ids) -> torch.Tensor:
        """As Q4CpuStack.routed, over int8 stacks."""
        return cpu_quant.moe8(x, ids, weights, self.q8, down.q8, self.n // 2)


__all__ = ["Q4CpuLinear", "Q4CpuStack", "Q8CpuLinear", "Q8CpuStack"]
