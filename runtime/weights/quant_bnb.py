"""bitsandbytes NF4 and int8 weights as callables for `layers.linear()` (CPU and CUDA).

bitsandbytes is imported on first use (it takes seconds and probes the unrelated Hugging Face
``kernels`` package, logging a harmless warning on CPU).

CPU trap (bitsandbytes 0.50): its native CPU ``dequantize_4bit`` / ``gemm_4bit`` treat blocks as
lying within one row, so weights whose input dim is not a multiple of the 64-element block come
out wrong (40 % relative error on a [72, 48] weight). Quantization itself is right, so on CPU we
dequantize the flattened weight (one row: blocks contiguous, as quantized) and run F.linear; CUDA
uses ``bnb.matmul_4bit`` (its gemv fast path at decode).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

NF4_BLOCK = 64


def _bnb():
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


class Nf4Weight:
    """W [out, in] as NF4: ``q`` uint8 [(out*in+1)//2, 1] packed, ``absmax`` fp32 per block."""

    def __init__(
        self, q: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
    ):
        self.q, self.absmax, self.shape, self.dtype = q, absmax, tuple(shape), dtype
        self._state = None

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Nf4Weight:
        bnb = _bnb()
        q, state = bnb.functional.quantize_4bit(
            w.contiguous(), blocksize=NF4_BLOCK, quant_type="nf4", compress_statistics=False
        )
        return cls(q, state.absmax, tuple(w.shape), w.dtype)

    def state(self, flat: bool = False):
        bnb = _bnb()
        if self._state is None or self._state.absmax.device != self.q.device:
            self._state = bnb.functional.QuantState(
                absmax=self.absmax,
                shape=torch.Size(self.shape),
                code=bnb.functional.get_4bit_type("nf4", device=self.q.device),
                blocksize=NF4_BLOCK,
                quant_type="nf4",
                dtype=self.dtype,
            )
        if not flat:
            return self._state
        st = copy.copy(self._state)
        st.shape = torch.Size([1, self.shape[0] * self.shape[1]])
        return st

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.absmax.numel() * 4

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "absmax": self.absmax}

    def dequantize(self) -> torch.Tensor:
        bnb = _bnb()
        return bnb.functional.dequantize_4bit(self.q, self.state(flat=True)).view(self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            bnb = _bnb()
            return bnb.matmul_4bit(x.to(self.dtype), self.q.t(), self.state()).to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype))


class Int8Weight:
    """W [out, in] as LLM.int8(): ``cb`` int8 [out, in], ``scb`` fp32 [out] row absmax. On CUDA
    bitsandbytes' int8 GEMM (activations quantized per row); on CPU torch's weight-only int8
    kernel over the same bytes (runtime/weights/quant_cpu.py)."""

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor):
        self.cb, self.scb = cb, scb
        self._cpu = None  # quant_cpu.Int8CpuLinear over cb, built on the first CPU call

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Weight:
        bnb = _bnb()
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return cls(cb, scb)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.cb.shape)

    @property
    def device(self) -> torch.device:
        return self.cb.device

    @property
    def nbytes(self) -> int:
        return self.cb.numel() + self.scb.numel() * 4

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"cb": self.cb, "scb": self.scb}

    def dequantize(self) -> torch.Tensor:
        """W [out, in] fp32 as the CPU kernel applies it (bf16 row scales)."""
        from runtime.weights.quant_cpu import Int8CpuLinear

        return Int8CpuLinear(self.cb, self.scb / 127.0).dequantize()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # torch's weight-only int8 kernel on these same bytes
            if self._cpu is None:
                from runtime.weights.quant_cpu import Int8CpuLinear

                self._cpu = Int8CpuLinear(self.cb, self.scb / 127.0)
            return self._cpu(x)
        bnb = _bnb()
        x2 = x.reshape(-1, x.shape[-1])
        ca, sca, _ = bnb.functional.int8_vectorwise_quant(x2.to(torch.float16).contiguous())
        y = torch.ops.bitsandbytes.int8_scaled_mm.default(
            ca, self.cb, sca, self.scb, bias=None, dtype=x.dtype
        )
        return y.view(*x.shape[:-1], self.cb.shape[0])
