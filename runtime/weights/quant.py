"""Quantized weights for `layers.linear()`: bitsandbytes NF4 / int8 and kvscope's own int4 groups.

A quantized weight is an object callable as ``w(x) -> x @ W.T`` (W [out, in]); `linear()` calls it.
Every weight class also exposes ``shape`` (out, in), ``device``, ``nbytes`` and ``tensors()`` (its
storage as named tensors, the unit the expert cache copies).

Methods (``--quant``):
- ``nf4``: bitsandbytes 4-bit NormalFloat, blocks of 64 along the flattened weight, fp32 absmax.
- ``int8``: bitsandbytes LLM.int8() without outlier decomposition (row-wise absmax weights,
  row-wise absmax fp16 activations, int8 GEMM, fp32 dequant).
- ``int4``: group-wise asymmetric int4 (group 128 along the input dim, fp16 scales and integer
  zero points), layout in ``kernels.int4_moe``; routed experts run the fused w4a16 Triton kernel
  on CUDA, dense weights dequantize per call there.

On CPU, int8 and int4 weights compute through torch's packed weight-only kernels, repacked once
at load (runtime/weights/quant_cpu.py): bitsandbytes int8 weights call the int8 kernel on their
own bytes, int4 weights whose shape the kernel takes are retiled (others dequantize per call).

What is quantized: the linear weights of attention, dense MLPs, shared experts and routed experts
(names in LINEAR_SUFFIXES), and the LM head, which every method stores as int8 (``HEAD_METHOD``:
llama.cpp likewise keeps its output layer at 6-8 bits; at a 32 k vocabulary it is the largest
single read of a decode step). Embeddings (one row read per token), norms, the router and the
DSA indexer's head-weight projection stay in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.errors import KvscopeError

METHODS = ("none", "nf4", "int8", "int4")
HEAD_METHOD = "int8"  # the LM head's format under any --quant but none (see head_format)
INT4_GROUP = 128
HEAD_INT4_GROUP = 32  # the LM head's int4 groups on the CPU (finer than the layers': ~4.8 bits)
INT4_SCALE_DTYPE = torch.float16

# Checkpoint names (suffixes) of weights that the models only use through `linear()`.
LINEAR_SUFFIXES = (
    ".q_a_proj.weight",
    ".q_b_proj.weight",
    ".kv_a_proj_with_mqa.weight",
    ".o_proj.weight",
    ".q_proj.weight",
    ".k_proj.weight",
    ".v_proj.weight",
    ".indexer.wq_b.weight",
    ".indexer.wk.weight",
    ".gate_proj.weight",
    ".up_proj.weight",
    ".down_proj.weight",
)


def is_linear_weight(name: str) -> bool:
    """Whether a checkpoint tensor is a linear weight that may be quantized (see module doc)."""
    return name.endswith(LINEAR_SUFFIXES)


def _int4():
    """kernels.int4_moe, imported on first use (it imports triton, ~0.5 s)."""
    import kernels.int4_moe

    return kernels.int4_moe


def int4_group(in_features: int) -> int:
    return min(INT4_GROUP, in_features)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise KvscopeError(f"--quant {method}: choose one of {', '.join(METHODS)}")
    return method


class Int4Weight:
    """One int4 weight [out, in]; dequantized to the activations' dtype per call."""

    def __init__(self, packed):  # kernels.int4_moe.Int4Packed [out, ...]
        self.packed = packed

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.out_features, self.packed.in_features)

    @property
    def device(self) -> torch.device:
        return self.packed.q.device

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.packed.q, "scales": self.packed.scales, "zeros": self.packed.zeros}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _int4().dequantize_int4(self.packed, x.dtype))


class Int4Stack:
    """Routed experts of one layer in int4, stacked for the fused kernel: ``packed.q`` is
    [E, N, ceil(K/2)]. ``stack[e]`` is expert e as an Int4Weight."""

    def __init__(self, packed):  # kernels.int4_moe.Int4Packed [E, out, ...]
        assert packed.q.dim() == 3
        self.packed = packed

    def __len__(self) -> int:
        return self.packed.q.shape[0]

    def __getitem__(self, e: int) -> Int4Weight:
        return Int4Weight(self.packed.expert(e))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes


def int4_moe_op(gate_up: Int4Stack, down: Int4Stack):
    """(x, weights, ids) -> routed-expert output over int4 stacks: the Triton kernel on CUDA
    (or under KVSCOPE_TRITON_INTERPRET=1), the torch reference otherwise."""

    def run(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        from kernels import backend
        from kernels.int4_moe import int4_moe, reference_int4_moe

        fn = int4_moe if backend.use_triton(x.device) else reference_int4_moe
        return fn(x, gate_up.packed, down.packed, ids, weights)

    return run


def head_format(method: str, device: torch.device) -> tuple[str, int]:
    """(method, int4 group) of the LM head under ``--quant method``: int8 everywhere, except
    int4 on the CPU, where the head is int4 in groups of 32 (~4.8 bits per weight, vs ~4.1 for
    the layers' groups of 128): at a 32 k vocabulary it is the largest single read of a CPU
    decode step (int8: 33 MB of ~90), and llama.cpp's Q4_0 files keep it at Q6_K (~6.6 bits).
    The quality table in docs/performance.md shows what it costs."""
    if method == "int4" and torch.device(device).type == "cpu":
        return "int4", HEAD_INT4_GROUP
    return HEAD_METHOD, INT4_GROUP


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' LLM.int8() row quantization (``int8_vectorwise_quant``, threshold 0) in
    plain torch, the same bytes without importing bitsandbytes (~190 MB resident on the CPU):
    w [N, K] -> (int8 [N, K], fp32 row absmax [N]); W ~= q * absmax / 127. An all-zero row
    gives zeros (bitsandbytes: 0 * inf, undefined)."""
    a = w.to(torch.float16)
    stats = a.abs().amax(dim=1).float()
    q = torch.round(a * (127.0 / stats.unsqueeze(-1)))
    return torch.where(stats.unsqueeze(-1) > 0, q, 0.0).to(torch.int8), stats


ROW_CHUNK = 4096  # rows of a large weight (the LM head) quantized at a time


def _quantize_rows_chunked(w: torch.Tensor, method: str, group: int):
    """A large [out, in] weight (the LM head: 32 k rows) quantized ROW_CHUNK rows at a time into
    kvscope's VNNI layouts (rows are independent in both formats, and ROW_CHUNK is a multiple
    of their 16-row tiles), so the quantizers' fp32 temporaries stay a chunk's size (a whole
    cpu-mini head at once: ~500 MB of them, the peak of a load). None when those kernels are
    unavailable (the caller quantizes the weight whole)."""
    from kernels import cpu_quant
    from runtime.weights.vnni import Q4CpuLinear, Q8CpuLinear

    if method not in ("int8", "int4") or not cpu_quant.available():
        return None  # decided before quantizing anything: no chunk is quantized twice
    parts = [
        quantize_weight(w[r : r + ROW_CHUNK], method, group=group)
        for r in range(0, w.shape[0], ROW_CHUNK)
    ]
    if method == "int4" and all(type(p) is Q4CpuLinear for p in parts):
        a = parts[0]
        qw, sc, zp = (torch.cat([getattr(p, f) for p in parts]) for f in ("qw", "sc", "zp"))
        return Q4CpuLinear(qw, sc, zp, n=w.shape[0], k=a.k, group=a.group)
    if method == "int8" and all(type(p) is Q8CpuLinear for p in parts):
        qw, rs = (torch.cat([getattr(p, f) for p in parts]) for f in ("qw", "rs"))
        return Q8CpuLinear(qw, rs, n=w.shape[0], k=parts[0].k)
    return None


def quantize_weight(w: torch.Tensor, method: str, storage: bool = False, group: int = INT4_GROUP):
    """W [out, in] in the compute dtype -> a weight usable with linear() (W itself for none).
    On CPU, int4 weights the packed CPU kernel takes come back in its layout (quant_cpu.py);
    ``storage`` asks for the device-independent record format instead (ExpertFormat)."""
    if method == "none":
        return w
    if w.device.type == "cpu" and not storage and w.shape[0] > ROW_CHUNK:
        big = _quantize_rows_chunked(w, method, group)
        if big is not None:
            return big
    if method == "int4":
        packed = _int4().quantize_int4(w, group, INT4_SCALE_DTYPE)
        if w.device.type == "cpu" and not storage:
            from runtime.weights.quant_cpu import Int4CpuLinear
            from runtime.weights.vnni import Q4CpuLinear

            fast = Q4CpuLinear.from_packed(packed) or Int4CpuLinear.from_packed(packed)
            if fast is not None:
                return fast
        return Int4Weight(packed)
    from runtime.weights import quant_bnb

    if method == "nf4":
        return quant_bnb.Nf4Weight.quantize(w)
    if method == "int8":
        if w.device.type == "cpu" and not storage:  # the same bytes, in a CPU kernel's layout
            from runtime.weights.quant_cpu import Int8CpuLinear
            from runtime.weights.vnni import Q8CpuLinear

            cb, scb = int8_rows(w)
            return Q8CpuLinear.of(cb, scb / 127.0) or Int8CpuLinear(cb, scb / 127.0)
        return quant_bnb.Int8Weight.quantize(w)
    raise KvscopeError(f"--quant {method}: choose one of {', '.join(METHODS)}")


def linear_nbytes(out_f: int, in_f: int, method: str, dtype: torch.dtype) -> int:
    """Bytes a [out, in] linear weight takes once quantized with ``method`` (for fit checks)."""
    n = out_f * in_f
    if method == "none":
        return n * dtype.itemsize
    if method == "int4":
        groups = -(-in_f // int4_group(in_f))
        return out_f * (-(-in_f // 2)) + 2 * out_f * groups * INT4_SCALE_DTYPE.itemsize
    if method == "nf4":
        return (n + 1) // 2 + 4 * -(-n // 64)
    if method == "int8":
        return n + 4 * out_f
    raise KvscopeError(f"--quant {method}: choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class ExpertFormat:
    """How one routed expert (gate_up [2I, D] gate rows first, down [D, I]) is stored.

    ``encode`` turns full-precision weights into a record (named tensors, the unit the expert
    store keeps and the cache copies); ``decode`` turns a record (wherever it lives) into the two
    weights the expert loop passes to linear(); ``spec`` gives the record's shapes and dtypes so a
    cache can preallocate slots. Records of every expert of a model have the same spec.
    """

    method: str
    dtype: torch.dtype  # compute dtype
    d: int  # hidden size
    i: int  # moe intermediate size

    def _parts(self) -> dict[str, tuple[int, int]]:
        return {"gate_up": (2 * self.i, self.d), "down": (self.d, self.i)}

    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for part, (n, k) in self._parts().items():
            if self.method == "none":
                out[part] = ((n, k), self.dtype)
            elif self.method == "int4":
                ng = -(-k // int4_group(k))
                out[f"{part}.q"] = ((n, -(-k // 2)), torch.uint8)
                out[f"{part}.scales"] = ((n, ng), INT4_SCALE_DTYPE)
                out[f"{part}.zeros"] = ((n, ng), INT4_SCALE_DTYPE)
            elif self.method == "nf4":
                out[f"{part}.q"] = (((n * k + 1) // 2, 1), torch.uint8)
                out[f"{part}.absmax"] = ((-(-n * k // 64),), torch.float32)
            elif self.method == "int8":
                out[f"{part}.cb"] = ((n, k), torch.int8)
                out[f"{part}.scb"] = ((n,), torch.float32)
        return out

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * dt.itemsize for shape, dt in self.spec().values())

    def encode(self, gate_up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        rec: dict[str, torch.Tensor] = {}
        for part, w in (("gate_up", gate_up), ("down", down)):
            q = quantize_weight(w.to(self.dtype).contiguous(), self.method, storage=True)
            if isinstance(q, torch.Tensor):
                rec[part] = q
            else:
                rec.update({f"{part}.{k}": t.contiguous() for k, t in q.tensors().items()})
        return rec

    def decode(self, rec: dict[str, torch.Tensor]) -> tuple:
        """Record -> (gate_up weight, down weight) for linear(); views into ``rec``."""
        if self.method == "none":
            return rec["gate_up"], rec["down"]
        out = []
        for part, (n, k) in self._parts().items():
            if self.method == "int4":
                p = _int4().Int4Packed(
                    rec[f"{part}.q"], rec[f"{part}.scales"], rec[f"{part}.zeros"], k, int4_group(k)
                )
                out.append(Int4Weight(p))
            else:
                from runtime.weights import quant_bnb

                if self.method == "nf4":
                    out.append(
                        quant_bnb.Nf4Weight(
                            rec[f"{part}.q"], rec[f"{part}.absmax"], (n, k), self.dtype
                        )
                    )
                else:
                    out.append(quant_bnb.Int8Weight(rec[f"{part}.cb"], rec[f"{part}.scb"]))
        return tuple(out)


EXPERT_CHUNK = 8  # experts quantized at a time: bounds the fp32 temporaries of a load


def _chunks(fn, stack: torch.Tensor) -> list:
    """fn over slices of EXPERT_CHUNK experts of a stack [E, ...]: the quantizers' fp32
    temporaries then scale with the slice, not with all E experts (the peak RSS of a load)."""
    return [fn(stack[i : i + EXPERT_CHUNK]) for i in range(0, stack.shape[0], EXPERT_CHUNK)]


def chunked_resident_experts(read, n_experts: int, method: str, device, pack: bool = False):
    """Fields of `layers.Experts` for routed experts read EXPERT_CHUNK at a time through
    ``read(lo, hi) -> (gate_up [hi-lo, 2I, D], down [hi-lo, D, I])`` and quantized chunk by
    chunk, so a load never holds a layer's whole stack in the compute dtype (cpu-mini: 192 MB
    of bf16 per layer): only for the stacks that concatenate (kvscope's VNNI int8 / int4 on the
    CPU); None otherwise (the caller reads the whole stack for resident_experts)."""
    from kernels import cpu_quant

    if method not in ("int8", "int4") or torch.device(device).type != "cpu" or pack:
        return None
    if not cpu_quant.available():
        return None
    parts = [
        resident_experts(*read(lo, min(lo + EXPERT_CHUNK, n_experts)), method)
        for lo in range(0, n_experts, EXPERT_CHUNK)
    ]
    kinds = {(type(p["gate_up"]), type(p["down"])) for p in parts}
    if len(kinds) != 1 or any(set(p) != {"gate_up", "down"} for p in parts):
        return None  # the kernels declined these shapes: whole-stack path
    gu_t, dn_t = kinds.pop()
    if not (hasattr(gu_t, "concat") and hasattr(dn_t, "concat")):
        return None
    return {
        "gate_up": gu_t.concat([p["gate_up"] for p in parts]),
        "down": dn_t.concat([p["down"] for p in parts]),
    }


def resident_experts(
    gate_up: torch.Tensor, down: torch.Tensor, method: str, pack: bool = False
) -> dict:
    """Fields of `layers.Experts` for routed experts kept on the compute device, quantized with
    ``method``: stacked tensors (none), or per expert oneDNN-packed bf16 with ``pack`` (the
    plan's pack_bf16: runtime/weights/dense_cpu.py); on CPU, int8 and int4 as packed stacks
    (quant_cpu.Int8CpuStack / Int4CpuStack: the expert loop and the compiled CPU decode step
    read each selected expert in place); an Int4Stack pair + the fused op (int4 on CUDA, or on
    CPU when the packed CPU kernel cannot take the shapes), or per-expert weights for linear()
    (nf4, int8 on CUDA)."""
    if method == "none" and pack:  # per-expert oneDNN-packed bf16 (dense_cpu.py)
        from runtime.weights.dense_cpu import pack as pack_bf16

        return {"gate_up": [pack_bf16(w) for w in gate_up], "down": [pack_bf16(w) for w in down]}
    if method == "none":
        return {"gate_up": gate_up, "down": down}
    if method == "int4" and gate_up.device.type == "cpu":  # kvscope's own kernels (vnni.py)
        from runtime.weights.vnni import Q4CpuStack

        def q4(stack: torch.Tensor):
            return Q4CpuStack.from_packed(
                _int4().quantize_int4(stack, INT4_GROUP, INT4_SCALE_DTYPE)
            )

        gu = Q4CpuStack.concat(_chunks(q4, gate_up))
        if gu is not None:
            dn = Q4CpuStack.concat(_chunks(q4, down))
            if dn is not None:
                return {"gate_up": gu, "down": dn}
    if method == "int8" and gate_up.device.type == "cpu":  # kvscope's own kernels (vnni.py)
        from runtime.weights.vnni import Q8CpuStack

        def q8(w: torch.Tensor):  # bitsandbytes' per-row bytes (rows are independent)
            cb, scb = int8_rows(w.reshape(-1, w.shape[-1]))
            e, n = w.shape[0], w.shape[1]
            return Q8CpuStack.of(cb.view(e, n, -1), scb.view(e, n) / 127.0)

        stacks = [Q8CpuStack.concat(_chunks(q8, w)) for w in (gate_up, down)]
        if stacks[0] is not None and stacks[1] is not None:
            return {"gate_up": stacks[0], "down": stacks[1]}
    if method in ("int8", "int4") and gate_up.device.type == "cpu":
        from runtime.weights.quant_cpu import stack_experts

        # one packed [E, ...] stack per projection (quant_cpu.py), when every expert took the
        # packed CPU kernel's layout (int4: shapes it accepts); else per-expert weights below
        gu = stack_experts([quantize_weight(w, method) for w in gate_up])
        dn = stack_experts([quantize_weight(w, method) for w in down]) if gu is not None else None
        if gu is not None and dn is not None:
            return {"gate_up": gu, "down": dn}
    if method == "int4":
        gu = Int4Stack(_int4().quantize_int4(gate_up, INT4_GROUP, INT4_SCALE_DTYPE))
        dn = Int4Stack(_int4().quantize_int4(down, INT4_GROUP, INT4_SCALE_DTYPE))
        return {"gate_up": gu, "down": dn, "fused": int4_moe_op(gu, dn)}
    return {
        "gate_up": [quantize_weight(w, method) for w in gate_up],
        "down": [quantize_weight(w, method) for w in down],
    }
