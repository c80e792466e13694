"""CPU compute for quantized linear weights: torch's packed weight-only GEMM kernels.

On a CPU, decode at small batch reads every weight byte once per step, so the format's bytes set
the speed, if the kernel streams them without first expanding them. Dequantizing a weight per
call (what the generic paths in quant.py / quant_bnb.py do) reads the packed bytes, writes and
re-reads a full-precision copy: slower than not quantizing at all. These classes keep the weight
in the layout an ATen CPU kernel streams directly, repacked once at load:

- ``Int8CpuLinear``: int8 [N, K] + one scale per output row; ``torch._weight_int8pack_mm``
  (AVX-512 / AVX2 vectorised weight-only int8 GEMM, int8 expanded in registers). The kernel
  reads past the row end unless K % 16 == 0 (torch 2.13: NaNs or a segfault at K = 24, 500,
  ...), so other K are padded with zero columns once at load (and the activations per call).
- ``Int4CpuLinear``: 4-bit groups along K (group 32..256) with a scale and a zero per group, in
  the tile layout of ``torch._convert_weight_to_int4pack_for_cpu``; ``torch._weight_int4pack_mm
  _for_cpu``. Needs N % 16 == 0 and K % group == 0; other shapes keep quant.Int4Weight.

Routed experts of a layer are kept as one stack per projection (``Int8CpuStack`` /
``Int4CpuStack``: the packed tensors of all E experts in one [E, ...] tensor); ``stack[e]`` is
expert e's linear object over views of it. The eager expert loop indexes it with Python ints, the
compiled CPU decode step (runtime/models/decode_step.py) with expert ids read inside the graph.

Every class here has ``graph_safe = True``: its weights are plain attribute tensors and its call is
torch ops only, so runtime/models/cpu_graph.py can bind those tensors to inputs of a compiled step
(nothing copied into the compiled library) and trace the call.

Both take activations in bf16 (their fast path; fp32 activations run ~10-40x slower in these
kernels), accumulate in fp32 and return bf16, cast back to the caller's dtype: the rounding of
activations to bf16 is part of these formats (llama.cpp's Q8_0 / Q4_0 dots round activations to
8 bits). ``dequantize()`` gives the weight these kernels use, for reference paths and tests.
Measured per kernel and format in docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the CPU int4 kernel takes


def _as_2d_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16)


class Int8CpuLinear:
    """W [N, K] = q [N, K] int8 * scale [N] (bf16)."""

    K_ALIGN = 16  # the kernel's K granularity (see the module doc)
    graph_safe = True

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        assert q.dtype == torch.int8 and q.dim() == 2 and scale.shape == (q.shape[0],)
        self.k = q.shape[1]
        self.pad = -self.k % self.K_ALIGN
        self.q = F.pad(q, (0, self.pad)).contiguous() if self.pad else q.contiguous()
        self.scale = scale.to(torch.bfloat16).contiguous()

    @classmethod
    def packed(cls, q: torch.Tensor, scale: torch.Tensor, k: int) -> Int8CpuLinear:
        """Over already padded q [N, K + pad] and bf16 scale [N] (views, nothing copied)."""
        out = cls.__new__(cls)
        out.k, out.pad, out.q, out.scale = k, q.shape[1] - k, q, scale
        return out

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8CpuLinear:
        """Symmetric per-row absmax, round to nearest."""
        wf = w.float()
        scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.k)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "scale": self.scale}

    def dequantize(self) -> torch.Tensor:
        return self.q[:, : self.k].float() * self.scale.float()[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _as_2d_bf16(x)
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        y = torch._weight_int8pack_mm(x2, self.q, self.scale)  # [M, N] bf16
        return y.to(x.dtype).view(*x.shape[:-1], self.q.shape[0])


class Int4CpuLinear:
    """W [N, K] in 4-bit groups: w = (q - 8) * scale + zero per (row, group), q in [0, 16)."""

    graph_safe = True

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int, group):
        self.packed, self.scales_zeros = packed, scales_zeros  # uint8 tiles, bf16 [K/G, N, 2]
        self.n, self.k, self.group = n, k, group

    @staticmethod
    def supports(n: int, k: int, group: int) -> bool:
        return n % 16 == 0 and group in INT4_GROUPS and k % group == 0

    @classmethod
    def from_packed(cls, p) -> Int4CpuLinear | None:
        """From kernels.int4_moe.Int4Packed [N, ceil(K/2)] (asymmetric groups, integer zero
        points): the same 4-bit values, retiled; None when the kernel cannot take the shape."""
        n, k, g = p.q.shape[0], p.in_features, p.group
        if p.q.dim() != 2 or not cls.supports(n, k, g):
            return None
        q = torch.stack([p.q & 0xF, p.q >> 4], dim=-1).flatten(-2)[:, :k].to(torch.int32)
        tiles = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        s = p.scales.float()  # (q - zp) * s == (q - 8) * s + (8 - zp) * s
        z = (8.0 - p.zeros.float()) * s
        sz = torch.stack([s, z], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        return cls(tiles, sz, n, k, g)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales_zeros": self.scales_zeros}

    def dequantize(self) -> torch.Tensor:
        """W [N, K] fp32, from the kernel itself (identity activations), so it is exactly the
        weight the kernel multiplies by (up to the bf16 output rounding of each element)."""
        eye = torch.eye(self.k, dtype=torch.bfloat16, device=self.device)
        return (
            torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scales_zeros)
            .float()
            .t()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(
            _as_2d_bf16(x), self.packed, self.group, self.scales_zeros
        )  # [M, N] bf16
        return y.to(x.dtype).view(*x.shape[:-1], self.n)


class Int8CpuStack:
    """E int8 experts of one projection: q [E, N, K + pad] int8, scale [E, N] bf16."""

    graph_safe = True
    expert_stack = True  # layers.Experts.packed_stacks(): indexable by an expert id tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, k: int):
        self.q, self.scale, self.k = q, scale, k

    @classmethod
    def of(cls, experts: list[Int8CpuLinear]) -> Int8CpuStack:
        return cls(
            torch.stack([w.q for w in experts]),
            torch.stack([w.scale for w in experts]),
            experts[0].k,
        )

    def __len__(self) -> int:
        return self.q.shape[0]

    def __getitem__(self, e) -> Int8CpuLinear:  # e: int, or a SymInt read inside a graph
        return Int8CpuLinear.packed(self.q[e], self.scale[e], self.k)

    @property
    def shape(self) -> tuple[int, int]:  # one expert's (N, K)
        return (self.q.shape[1], self.k)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


class Int4CpuStack:
    """E int4 experts of one projection: packed [E, N, K/2] uint8 tiles, scales_zeros
    [E, K/G, N, 2] bf16 (Int4CpuLinear's layout per expert)."""

    graph_safe = True
    expert_stack = True

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int, group):
        self.packed, self.scales_zeros = packed, scales_zeros
        self.n, self.k, self.group = n, k, group

    @classmethod
    def of(cls, experts: list[Int4CpuLinear]) -> Int4CpuStack:
        w = experts[0]
        return cls(
            torch.stack([x.packed for x in experts]),
            torch.stack([x.scales_zeros for x in experts]),
            w.n,
            w.k,
            w.group,
        )

    def __len__(self) -> int:
        return self.packed.shape[0]

    def __getitem__(self, e) -> Int4CpuLinear:
        return Int4CpuLinear(self.packed[e], self.scales_zeros[e], self.n, self.k, self.group)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2


def stack_experts(experts: list) -> Int8CpuStack | Int4CpuStack | None:
    """One stack of per-expert packed weights of one kind, or None (mixed or other kinds)."""
    for cls, stack in ((Int8CpuLinear, Int8CpuStack), (Int4CpuLinear, Int4CpuStack)):
        if all(type(w) is cls for w in experts):
            return stack.of(experts)
    return None


__all__ = [
    "INT4_GROUPS",
    "Int4CpuLinear",
    "Int4CpuStack",
    "Int8CpuLinear",
    "Int8CpuStack",
    "stack_experts",
]
