"""kvscope's own CPU kernels for quantized weights (kernels/cpu/quant.cpp): int4 groups and int8
rows, times int8-quantized activations.

Why our own: at batch 1 a decode step streams every weight byte once, so a 4-bit weight should
cost a quarter of a bf16 one. torch's packed int4 CPU kernel (``_weight_int4pack_mm_for_cpu``)
expands each nibble to fp32 and multiplies in fp32: ~20 G weights/s on one core, compute-bound
below the memory's rate, and its cost grows almost linearly with the rows (4x at 8 rows). These
kernels quantize the activations to int8 per block of 32 (as llama.cpp's Q4_0 x Q8_0 dots do) and
multiply 4-bit by 8-bit integers with AVX-512 VNNI (``vpdpbusd``: 64 multiply-adds per
instruction), 16 output rows per register, up to 8 tokens per pass over a weight tile; the routed
experts of a MoE layer run as one call that reads each selected expert once for all its tokens
(the grouped GEMV of issue 17). Measured in docs/performance.md.

Built at first use with the system's C++ compiler (``g++ -O3 -march=native -fopenmp``) into
``$XDG_CACHE_HOME/kvscope/ext/<digest>/`` (digest of the source, compiler, flags and the CPU's
flags: a changed source or another CPU never reuses a stale library); loaded with ctypes. Where
there is no compiler, the build fails, or the CPU lacks AVX-512 VNNI (``isa()`` is "scalar"),
``available()`` is False with a reason and the callers keep torch's int8 / int4 kernels
(runtime/weights/quant_cpu.py). ``KVSCOPE_VNNI=0`` turns them off.

Weight layout (``Q4Tensors``, see quant.cpp for the byte order): for W [N, K] with group G (a
multiple of 32) and K padded to Kp (multiple of G), N to N16 * 16::

    qw  uint8 [N16, Kp / 8, 64]    4-bit q, 16 rows x 8 columns per 64 bytes
    sc  int16 [N16, Kp / G, 16]    fp16 bits of the group scale s
    zp  int8  [N16, Kp / G, 16]    integer zero point z
    W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]

int8 (``Q8Tensors``, ``pack8``): bitsandbytes' symmetric per-row bytes W = q * r[n], stored as
q + 128 (unsigned, for ``vpdpbusd``) in tiles of 16 rows x 4 columns per 64 bytes (qw uint8
[N16, Kp / 4, 64], Kp = K padded to 32) and r as fp32 [N16, 16]; the +128 comes back out
through each activation block's sum.

Torch ops (usable eagerly and inside the compiled CPU decode step, runtime/models/cpu_graph.py):
``torch.ops.kvscope.q4_linear(x, qw, sc, zp, n, g)`` -> x [M, K] @ W^T as [M, n] in x's dtype
(fp32 or bf16), and ``torch.ops.kvscope.q4_moe(x, ids, weights, gu_qw, gu_sc, gu_zp, gu_g,
dn_qw, dn_sc, dn_zp, dn_g, inter)`` -> [M, D]; ``q8_linear(x, qw, rs, n)`` and ``q8_moe(x, ids,
weights, gu_qw, gu_rs, dn_qw, dn_rs, inter)`` likewise for int8. ``reference_linear`` /
``reference_moe`` compute the same in plain torch (activation rounding included) for tests.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import threading
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("cpu") / "quant.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BLOCK = 32  # activation quantization block; weight groups are multiples of it
VECTOR_ISAS = ("avx512vnni",)

_lock = threading.RLock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvscope" / "ext"


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def build(extra: tuple[str, ...] = ()) -> Path:
    """Compile quant.cpp (once per source, compiler, flags and CPU) and return the library's path.
    Raises RuntimeError with the compiler's message when it fails."""
    cxx = _compiler()
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C++ compiler ({cxx}): {e}") from None
    flags = FLAGS + tuple(extra)
    digest = hashlib.sha256(
        "\n".join([SOURCE.read_text(), cxx, version, " ".join(flags), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    out = _cache_dir() / digest / "libkvq4.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"libkvq4.{os.getpid()}.{threading.get_ident()}.so")
    proc = subprocess.run(
        [cxx, *flags, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        msg = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
        raise RuntimeError(f"{cxx} failed on {SOURCE.name}: {msg}")
    os.replace(tmp, out)  # atomic: a concurrent build of the same digest is harmless
    return out


def load(extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The library built with ``extra`` flags (``("-DKVQ4_FORCE_SCALAR",)``: the scalar path),
    loaded once per process."""
    with _lock:
        lib = _state.get(("loaded", extra))
    if lib is not None:
        return lib
    lib = ctypes.CDLL(str(build(extra)))
    lib.kvq4_isa.restype = ctypes.c_char_p
    vp, i = ctypes.c_void_p, ctypes.c_int
    lib.kvq4_linear.argtypes = [vp, i, i, i, i, vp, vp, vp, i, i, vp, i]
    lib.kvq4_linear.restype = None
    lib.kvq4_moe.argtypes = [vp, i, i, i, vp, vp, i, i, i]  # x .. inter
    lib.kvq4_moe.argtypes += [vp, vp, vp, i, i, vp, vp, vp, i, i, vp, i]  # gate_up, down, y
    lib.kvq4_moe.restype = None
    lib.kvq8_linear.argtypes = [vp, i, i, i, i, vp, vp, i, vp, i]
    lib.kvq8_linear.restype = None
    lib.kvq8_moe.argtypes = [vp, i, i, i, vp, vp, i, i, i, vp, vp, i, vp, vp, i, vp, i]
    lib.kvq8_moe.restype = None
    with _lock:
        _state[("loaded", extra)] = lib
    return lib


def _lib() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = None, ""
            if os.environ.get("KVSCOPE_VNNI", "1") == "0":
                _state["why"] = "KVSCOPE_VNNI=0"
            else:
                try:
                    lib = load()
                    isa = lib.kvq4_isa().decode()
                    if isa in VECTOR_ISAS:
                        _state["lib"] = lib
                    else:
                        _state["why"] = f"this CPU has no AVX-512 VNNI (kernel ISA: {isa})"
                except (RuntimeError, OSError) as e:
                    _state["why"] = str(e)
        return _state["lib"]


def available() -> bool:
    """True when the vector kernels are built and this CPU runs them."""
    return _lib() is not None


def unavailable_reason() -> str:
    _lib()
    return _state.get("why", "")


def isa() -> str:
    lib = _lib()
    return lib.kvq4_isa().decode() if lib is not None else "none"


# ---- weight packing ---------------------------------------------------------------------------
class Q4Tensors(NamedTuple):
    qw: torch.Tensor  # uint8 [..., N16, Kp / 8, 64]
    sc: torch.Tensor  # int16 [..., N16, Kp / G, 16] (fp16 bits)
    zp: torch.Tensor  # int8 [..., N16, Kp / G, 16]
    n: int
    k: int
    group: int


def supports(k: int, group: int) -> bool:
    """The group sizes the kernel takes: multiples of 32 (K itself is padded to the groups)."""
    return group % BLOCK == 0 and group > 0 and k > 0


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, group: int):
    """From q uint8 [..., N, K] (values 0..15, one per byte), scales / zeros [..., N, ng] (ng =
    ceil(K / G); zeros integers) -> Q4Tensors. Scales are stored as fp16 (kvscope's int4 format
    keeps fp16 scales: the same weight as the generic dequantization)."""
    *lead, n, _ = q.shape
    ng = scales.shape[-1]
    kp, n16 = ng * group, -(-n // 16)
    qp = torch.zeros((*lead, n16 * 16, kp), dtype=torch.uint8)
    qp[..., :n, :k] = q[..., :k]
    sp = torch.zeros((*lead, n16 * 16, ng), dtype=torch.float16)
    sp[..., :n, :] = scales.to(torch.float16)
    zp = torch.zeros((*lead, n16 * 16, ng), dtype=torch.int8)
    zp[..., :n, :] = zeros.round().to(torch.int8)
    t = qp.view(*lead, n16, 16, kp // 8, 2, 4).movedim(-3, -4).transpose(-1, -2)  # [.., C, l, j, h]
    qw = (t[..., 0] | (t[..., 1] << 4)).contiguous().view(*lead, n16, kp // 8, 64)
    sc = sp.view(torch.int16).view(*lead, n16, 16, ng).transpose(-1, -2).contiguous()
    zz = zp.view(*lead, n16, 16, ng).transpose(-1, -2).contiguous()
    return Q4Tensors(qw, sc, zz, n, k, group)


def from_int4_packed(p) -> Q4Tensors | None:
    """From kernels.int4_moe.Int4Packed (a weight [N, ...] or a stack [E, N, ...]): the same
    4-bit values, zero points and scales; None when the group does not fit."""
    k, g = p.in_features, p.group
    if not supports(k, g):
        return None
    q = torch.stack([p.q & 0xF, p.q >> 4], dim=-1).flatten(-2)[..., :k]
    return pack(q, p.scales, p.zeros, k, g)


class Q8Tensors(NamedTuple):
    qw: torch.Tensor  # uint8 [..., N16, Kp / 4, 64]: w + 128
    rs: torch.Tensor  # fp32 [..., N16, 16]: one scale per row
    n: int
    k: int


def pack8(q: torch.Tensor, scale: torch.Tensor, k: int) -> Q8Tensors:
    """From int8 q [..., N, >= K] (symmetric) and one scale per row [..., N] -> Q8Tensors:
    W = q[:, :K] * scale[:, None]."""
    *lead, n, _ = q.shape
    kp, n16 = -(-k // BLOCK) * BLOCK, -(-n // 16)
    qp = torch.zeros((*lead, n16 * 16, kp), dtype=torch.int16)
    qp[..., :n, :k] = q[..., :k].to(torch.int16)
    qw = (qp + 128).to(torch.uint8).view(*lead, n16, 16, kp // 4, 4).transpose(-2, -3)
    rs = torch.zeros((*lead, n16 * 16), dtype=torch.float32)
    rs[..., :n] = scale.float()
    return Q8Tensors(qw.contiguous().view(*lead, n16, kp // 4, 64), rs.view(*lead, n16, 16), n, k)


def unpack8(t: Q8Tensors) -> torch.Tensor:
    """The weight W [..., N, K] fp32 these tensors hold."""
    *lead, n16, c, _ = t.qw.shape
    q = t.qw.view(*lead, n16, c, 16, 4).transpose(-2, -3).reshape(*lead, n16 * 16, c * 4)
    w = (q.to(torch.int16) - 128).float() * t.rs.reshape(*lead, n16 * 16, 1)
    return w[..., : t.n, : t.k]


def unpack(t: Q4Tensors) -> torch.Tensor:
    """The weight W [..., N, K] fp32 these tensors hold (for references and tests)."""
    *lead, n16, c, _ = t.qw.shape
    b = t.qw.view(*lead, n16, c, 16, 4)
    q = torch.stack([b & 0xF, b >> 4], dim=-1)  # [.., C, lane, j, h]
    q = q.transpose(-1, -2).movedim(-3, -4).reshape(*lead, n16 * 16, c * 8)  # [.., N16*16, Kp]
    ng = c * 8 // t.group
    s = t.sc.transpose(-1, -2).contiguous().view(torch.float16).float().reshape(*lead, -1, ng)
    z = t.zp.transpose(-1, -2).reshape(*lead, -1, ng).float()
    w = (q.float() - z.repeat_interleave(t.group, -1)) * s.repeat_interleave(t.group, -1)
    return w[..., : t.n, : t.k]


# ---- reference (plain torch, the kernels' rounding) -------------------------------------------
def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> what the kernels multiply by: per block of 32, d = max|x| / 127, round(x / d)
    (half to even, in fp32) times d."""
    m, k = x.shape
    kp = -(-k // BLOCK) * BLOCK
    xb = F.pad(x.float(), (0, kp - k)).view(m, -1, BLOCK)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    xq = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1.0)), 0.0).clamp(-127, 127)
    return (xq * d).view(m, kp)[:, :k]


def _weight(t) -> torch.Tensor:
    return unpack8(t) if isinstance(t, Q8Tensors) else unpack(t)


def reference_linear(x: torch.Tensor, t: Q4Tensors | Q8Tensors) -> torch.Tensor:
    """x [M, K] -> [M, N] fp32, as q4_linear / q8_linear compute it (up to fp32 sum order)."""
    return quantize_activations(x) @ _weight(t).t()


def reference_moe(x, ids, weights, gu, dn, inter: int) -> torch.Tensor:
    """Routed experts as q4_moe / q8_moe compute them: x [M, D], ids / weights [M, K] -> [M, D]
    fp32."""
    xq = quantize_activations(x)
    wg, wd = _weight(gu), _weight(dn)  # [E, 2I, D], [E, D, I]
    out = torch.zeros(x.shape[0], x.shape[1])
    for m in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[m, j])
            if not 0 <= e < wg.shape[0]:
                continue
            h = xq[m : m + 1] @ wg[e].t()
            a = F.silu(h[:, :inter]) * h[:, inter:]
            out[m] += float(weights[m, j]) * (quantize_activations(a) @ wd[e].t())[0]
    return out


# ---- torch ops ----------------------------------------------------------------------------------
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_LIB = torch.library.Library("kvscope", "FRAGMENT")
_LIB.define("q4_linear(Tensor x, Tensor qw, Tensor sc, Tensor zp, int n, int g) -> Tensor")
_LIB.define(
    "q4_moe(Tensor x, Tensor ids, Tensor weights, Tensor gu_qw, Tensor gu_sc, Tensor gu_zp, "
    "int gu_g, Tensor dn_qw, Tensor dn_sc, Tensor dn_zp, int dn_g, int inter) -> Tensor"
)
_LIB.define("q8_linear(Tensor x, Tensor qw, Tensor rs, int n) -> Tensor")
_LIB.define(
    "q8_moe(Tensor x, Tensor ids, Tensor weights, Tensor gu_qw, Tensor gu_rs, Tensor dn_qw, "
    "Tensor dn_rs, int inter) -> Tensor"
)


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _DTYPES:
        x = x.float()
    return x.contiguous()


def _need() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:
        raise RuntimeError(f"kvscope CPU quantized kernels unavailable: {unavailable_reason()}")
    return lib


def _ptrs(*ts) -> list[int]:
    return [t.data_ptr() for t in ts]


def _run_linear(fn, x, n, weight_args) -> torch.Tensor:
    """x [..., K] -> [..., n] in x's dtype through ``fn(x, dtype, M, K, n, *weight_args, y,
    threads)`` (kvq4_linear / kvq8_linear)."""
    shape, xin = x.shape, _as_kernel_input(x.reshape(-1, x.shape[-1]))
    y = torch.empty((xin.shape[0], n), dtype=xin.dtype)
    if xin.shape[0]:
        m, k = xin.shape
        fn(xin.data_ptr(), _DTYPES[xin.dtype], m, k, n, *weight_args, y.data_ptr(),
           torch.get_num_threads())  # fmt: skip
    return y.to(x.dtype).view(*shape[:-1], n)


def _run_moe(fn, x, ids, weights, inter, n_experts, weight_args) -> torch.Tensor:
    """x [T, D], ids / weights [T, K] -> [T, D] through ``fn(x, dtype, T, D, ids, weights, K, E,
    inter, *weight_args, y, threads)`` (kvq4_moe / kvq8_moe)."""
    xin = _as_kernel_input(x)
    ids64 = ids.to(torch.int64).contiguous()
    w32 = weights.to(torch.float32).contiguous()
    y = torch.empty_like(xin)
    if xin.shape[0]:
        fn(xin.data_ptr(), _DTYPES[xin.dtype], xin.shape[0], xin.shape[1], ids64.data_ptr(),
           w32.data_ptr(), ids64.shape[1], n_experts, inter, *weight_args, y.data_ptr(),
           torch.get_num_threads())  # fmt: skip
    return y.to(x.dtype)


def _q4_linear(x, qw, sc, zp, n, g):
    return _run_linear(_need().kvq4_linear, x, n, [*_ptrs(qw, sc, zp), qw.shape[-2] * 8, g])


def _q4_moe(x, ids, weights, gu_qw, gu_sc, gu_zp, gu_g, dn_qw, dn_sc, dn_zp, dn_g, inter):
    gu = [*_ptrs(gu_qw, gu_sc, gu_zp), gu_qw.shape[-2] * 8, gu_g]
    dn = [*_ptrs(dn_qw, dn_sc, dn_zp), dn_qw.shape[-2] * 8, dn_g]
    return _run_moe(_need().kvq4_moe, x, ids, weights, inter, gu_qw.shape[0], gu + dn)


def _q8_linear(x, qw, rs, n):
    return _run_linear(_need().kvq8_linear, x, n, [*_ptrs(qw, rs), qw.shape[-2] * 4])


def _q8_moe(x, ids, weights, gu_qw, gu_rs, dn_qw, dn_rs, inter):
    gu = [*_ptrs(gu_qw, gu_rs), gu_qw.shape[-2] * 4]
    dn = [*_ptrs(dn_qw, dn_rs), dn_qw.shape[-2] * 4]
    return _run_moe(_need().kvq8_moe, x, ids, weights, inter, gu_qw.shape[0], gu + dn)


_LIB.impl("q4_linear", _q4_linear, "CPU")
_LIB.impl("q4_moe", _q4_moe, "CPU")
_LIB.impl("q8_linear", _q8_linear, "CPU")
_LIB.impl("q8_moe", _q8_moe, "CPU")


@torch.library.register_fake("kvscope::q8_linear")
def _q8_linear_fake(x, qw, rs, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("kvscope::q8_moe")
def _q8_moe_fake(x, ids, weights, gu_qw, gu_rs, dn_qw, dn_rs, inter):
    return x.new_empty(x.shape)


@torch.library.register_fake("kvscope::q4_linear")
def _q4_linear_fake(x, qw, sc, zp, n, g):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("kvscope::q4_moe")
def _q4_moe_fake(x, ids, weights, gu_qw, gu_sc, gu_zp, gu_g, dn_qw, dn_sc, dn_zp, dn_g, inter):
    return x.new_empty(x.shape)


def linear(x: torch.Tensor, t: Q4Tensors) -> torch.Tensor:
    return torch.ops.kvscope.q4_linear(x, t.qw, t.sc, t.zp, t.n, t.group)


def moe(x, ids, weights, gu: Q4Tensors, dn: Q4Tensors, inter: int) -> torch.Tensor:
    return torch.ops.kvscope.q4_moe(
        x, ids, weights, gu.qw, gu.sc, gu.zp, gu.group, dn.qw, dn.sc, dn.zp, dn.group, inter
    )


def linear8(x: torch.Tensor, t: Q8Tensors) -> torch.Tensor:
    return torch.ops.kvscope.q8_linear(x, t.qw, t.rs, t.n)


def moe8(x, ids, weights, gu: Q8Tensors, dn: Q8Tensors, inter: int) -> torch.Tensor:
    return torch.ops.kvscope.q8_moe(x, ids, weights, gu.qw, gu.rs, dn.qw, dn.rs, inter)


__all__ = [
    "Q4Tensors",
    "Q8Tensors",
    "linear8",
    "moe8",
    "pack8",
    "unpack8",
    "available",
    "build",
    "from_int4_packed",
    "isa",
    "linear",
    "load",
    "moe",
    "pack",
    "reference_linear",
    "reference_moe",
    "supports",
    "unavailable_reason",
    "unpack",
]
