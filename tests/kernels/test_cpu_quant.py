"""kvscope's CPU int4 / int8 kernels (kernels/cpu_quant.py, kernels/cpu/quant.cpp) vs plain torch.

The reference (cpu_quant.reference_linear / reference_moe) dequantizes the weight and rounds the
activations to int8 per block of 32 exactly as the kernel does, so the only difference left is
the order of fp32 sums: relative error bound 1e-5 of the output's scale. Odd shapes: K not a
multiple of 32 (padded), a partial last group, N not a multiple of 16 (padded rows), 1, 9 and
17 tokens (more than one chunk of 8), experts with no token, ids outside [0, E).

The scalar build (-DKVQ4_FORCE_SCALAR, what a CPU without AVX-512 VNNI compiles) is tested
everywhere a compiler exists; the vector build where this CPU runs it (skipped with the reason
otherwise).
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_quant
from kernels.int4_moe import dequantize_int4, quantize_int4

SHAPES = [(40, 72, 32), (24, 200, 64), (64, 130, 128), (17, 96, 32), (48, 256, 128)]  # N, K, G


def _lib(kind: str):
    try:
        lib = cpu_quant.load(("-DKVQ4_FORCE_SCALAR",) if kind == "scalar" else ())
    except RuntimeError as e:  # no compiler
        pytest.skip(str(e))
    if kind == "vector" and lib.kvq4_isa().decode() not in cpu_quant.VECTOR_ISAS:
        pytest.skip(f"this CPU has no AVX-512 VNNI (kernel ISA {lib.kvq4_isa().decode()})")
    return lib


def _linear(lib, x: torch.Tensor, t: cpu_quant.Q4Tensors) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty((x.shape[0], t.n), dtype=x.dtype)
    lib.kvq4_linear(
        x.data_ptr(), 0 if x.dtype == torch.float32 else 1, x.shape[0], x.shape[1], t.n,
        t.qw.data_ptr(), t.sc.data_ptr(), t.zp.data_ptr(), t.qw.shape[-2] * 8, t.group,
        y.data_ptr(), 1,
    )  # fmt: skip
    return y


def _linear8(lib, x: torch.Tensor, t: cpu_quant.Q8Tensors) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty((x.shape[0], t.n), dtype=x.dtype)
    lib.kvq8_linear(
        x.data_ptr(), 0 if x.dtype == torch.float32 else 1, x.shape[0], x.shape[1], t.n,
        t.qw.data_ptr(), t.rs.data_ptr(), t.qw.shape[-2] * 4, y.data_ptr(), 1,
    )  # fmt: skip
    return y


def _moe8(lib, x, ids, w, gu, dn, inter):
    x, ids, w = x.contiguous(), ids.to(torch.int64).contiguous(), w.float().contiguous()
    y = torch.empty_like(x)
    lib.kvq8_moe(
        x.data_ptr(), 0, x.shape[0], x.shape[1], ids.data_ptr(), w.data_ptr(), ids.shape[1],
        gu.qw.shape[0], inter, gu.qw.data_ptr(), gu.rs.data_ptr(), gu.qw.shape[-2] * 4,
        dn.qw.data_ptr(), dn.rs.data_ptr(), dn.qw.shape[-2] * 4, y.data_ptr(), 1,
    )  # fmt: skip
    return y


def _int8(shape, g):
    q = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    return q, torch.rand(shape[:-1], generator=g) * 0.01 + 1e-4


def _moe(lib, x, ids, w, gu, dn, inter):
    x, ids, w = x.contiguous(), ids.to(torch.int64).contiguous(), w.float().contiguous()
    y = torch.empty_like(x)
    lib.kvq4_moe(
        x.data_ptr(), 0, x.shape[0], x.shape[1], ids.data_ptr(), w.data_ptr(), ids.shape[1],
        gu.qw.shape[0], inter, gu.qw.data_ptr(), gu.sc.data_ptr(), gu.zp.data_ptr(),
        gu.qw.shape[-2] * 8, gu.group, dn.qw.data_ptr(), dn.sc.data_ptr(), dn.zp.data_ptr(),
        dn.qw.shape[-2] * 8, dn.group, y.data_ptr(), 1,
    )  # fmt: skip
    return y


def _close(y, ref, tol=1e-5):
    assert y.shape == ref.shape
    scale = float(ref.abs().max().clamp(min=1e-6))
    assert float((y.float() - ref).abs().max()) <= tol * scale


def test_pack_keeps_the_int4_weight_exactly():
    """Retiling keeps every 4-bit value, fp16 scale and zero point: unpack == dequantize_int4."""
    g = torch.Generator().manual_seed(0)
    for n, k, grp in SHAPES:
        p = quantize_int4(torch.randn(n, k, generator=g), grp)
        t = cpu_quant.from_int4_packed(p)
        assert t is not None and t.qw.shape == (-(-n // 16), -(-k // p.group) * p.group // 8, 64)
        assert torch.equal(cpu_quant.unpack(t), dequantize_int4(p, torch.float32))
    stack = quantize_int4(torch.randn(3, 40, 72, generator=g), 32)
    t = cpu_quant.from_int4_packed(stack)
    assert torch.equal(cpu_quant.unpack(t), dequantize_int4(stack, torch.float32))
    assert cpu_quant.from_int4_packed(quantize_int4(torch.randn(16, 48), 48)) is None  # G % 32


def test_activation_rounding_is_int8_per_block():
    x = torch.tensor([[0.0] * 31 + [1.27] + [2.0, -0.5] + [0.0] * 30])
    xq = cpu_quant.quantize_activations(x)
    assert xq.shape == x.shape
    assert torch.allclose(xq[0, 31], torch.tensor(1.27)) and torch.equal(xq[0, :31], x[0, :31])
    d = 2.0 / 127  # second block: max |x| = 2
    assert torch.allclose(xq[0, 33], torch.tensor(round(-0.5 / d) * d))


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("tokens", [1, 9, 17])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_reference(kind, tokens, shape):
    lib = _lib(kind)
    n, k, grp = shape
    g = torch.Generator().manual_seed(tokens + n)
    t = cpu_quant.from_int4_packed(quantize_int4(torch.randn(n, k, generator=g), grp))
    x = torch.randn(tokens, k, generator=g)
    x[0, :5] = 0.0  # a partly zero block
    if tokens > 1:
        x[1] = 0.0  # an all-zero token: d = 0
    ref = cpu_quant.reference_linear(x, t)
    _close(_linear(lib, x, t), ref)
    yb = _linear(lib, x.to(torch.bfloat16), t)  # bf16 in, bf16 out
    assert yb.dtype == torch.bfloat16
    ref_b = cpu_quant.reference_linear(x.to(torch.bfloat16).float(), t)
    _close(yb.float(), ref_b, tol=8e-3)  # one bf16 rounding of the output


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_scalar_and_vector_builds_agree(kind):
    """Both builds compute the same integer sums; fp32 order differs at most."""
    lib = _lib(kind)
    scalar = _lib("scalar")
    g = torch.Generator().manual_seed(5)
    t = cpu_quant.from_int4_packed(quantize_int4(torch.randn(48, 200, generator=g), 64))
    x = torch.randn(9, 200, generator=g)
    _close(_linear(lib, x, t), _linear(scalar, x, t), tol=1e-6)


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_moe_matches_reference_with_idle_experts(kind, tokens):
    """8 experts, some with no token, one id out of range (contributes nothing)."""
    lib = _lib(kind)
    g = torch.Generator().manual_seed(tokens)
    e, d, i, k = 8, 72, 48, 3
    gu = cpu_quant.from_int4_packed(quantize_int4(torch.randn(e, 2 * i, d, generator=g), 32))
    dn = cpu_quant.from_int4_packed(quantize_int4(torch.randn(e, d, i, generator=g), 32))
    x = torch.randn(tokens, d, generator=g)
    ids = torch.tensor([[1, 5, 6], [5, 6, 1], [6, 1, 9]] * 3)[:tokens]  # 0, 2-4, 7 idle; 9 out
    w = torch.rand(tokens, k, generator=g)
    ref = cpu_quant.reference_moe(x, ids, w, gu, dn, i)
    _close(_moe(lib, x, ids, w, gu, dn, i), ref)


def test_pack8_keeps_the_int8_weight_exactly():
    g = torch.Generator().manual_seed(0)
    for n, k in [(40, 72), (17, 200), (3, 31)]:
        q, sc = _int8((n, k), g)
        t = cpu_quant.pack8(q, sc, k)
        assert t.qw.shape == (-(-n // 16), -(-k // 32) * 8, 64)
        assert torch.equal(cpu_quant.unpack8(t), q.float() * sc[:, None])
    q, sc = _int8((3, 40, 72), g)  # a stack
    assert torch.equal(cpu_quant.unpack8(cpu_quant.pack8(q, sc, 72)), q.float() * sc[..., None])
    q, sc = _int8((24, 48), g)  # torch's int8 layout pads K: only the first k columns count
    assert torch.equal(
        cpu_quant.unpack8(cpu_quant.pack8(q, sc, 41)), (q.float() * sc[:, None])[:, :41]
    )


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("tokens", [1, 9, 17])
@pytest.mark.parametrize("shape", [(40, 72), (17, 200), (64, 1000), (16, 31)])
def test_linear8_matches_reference(kind, tokens, shape):
    lib = _lib(kind)
    g = torch.Generator().manual_seed(tokens + shape[0])
    t = cpu_quant.pack8(*_int8(shape, g), shape[1])
    x = torch.randn(tokens, shape[1], generator=g)
    if tokens > 1:
        x[1] = 0.0
    _close(_linear8(lib, x, t), cpu_quant.reference_linear(x, t))
    yb = _linear8(lib, x.to(torch.bfloat16), t)
    _close(yb.float(), cpu_quant.reference_linear(x.to(torch.bfloat16).float(), t), tol=8e-3)


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_moe8_matches_reference_with_idle_experts(kind, tokens):
    lib = _lib(kind)
    g = torch.Generator().manual_seed(tokens)
    e, d, i, k = 8, 72, 48, 3
    gu = cpu_quant.pack8(*_int8((e, 2 * i, d), g), d)
    dn = cpu_quant.pack8(*_int8((e, d, i), g), i)
    x = torch.randn(tokens, d, generator=g)
    ids = torch.tensor([[1, 5, 6], [5, 6, 1], [6, 1, -1]] * 3)[:tokens]  # -1: out of range
    w = torch.rand(tokens, k, generator=g)
    _close(_moe8(lib, x, ids, w, gu, dn, i), cpu_quant.reference_moe(x, ids, w, gu, dn, i))


def test_torch_ops_and_nan():
    """The registered ops (what models and the compiled step call): shapes, dtypes, and a NaN
    in the input comes out as NaN in the affected token (never as a plausible number)."""
    if not cpu_quant.available():
        pytest.skip(f"kvscope q4 kernels unavailable: {cpu_quant.unavailable_reason()}")
    g = torch.Generator().manual_seed(7)
    t = cpu_quant.from_int4_packed(quantize_int4(torch.randn(32, 64, generator=g), 32))
    x = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16)
    y = cpu_quant.linear(x, t)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    x[0, 1, 7] = float("nan")
    y = cpu_quant.linear(x, t)
    assert torch.isnan(y[0, 1]).all() and not torch.isnan(y[0, 0]).any()
    assert cpu_quant.linear(x[:, :0], t).shape == (2, 0, 32)  # no tokens
    t8 = cpu_quant.pack8(*_int8((32, 64), g), 64)
    y8 = cpu_quant.linear8(x, t8)
    assert y8.shape == (2, 3, 32) and torch.isnan(y8[0, 1]).all() and not torch.isnan(y8[1]).any()


def test_ops_inside_an_aoti_compiled_graph(tmp_path):
    """A graph exported with both ops, compiled by AOTInductor (as the CPU decode step is),
    returns exactly the eager result, non-contiguous input included."""
    if not cpu_quant.available():
        pytest.skip(f"kvscope q4 kernels unavailable: {cpu_quant.unavailable_reason()}")
    from tests.runtime.test_cpu_graph import _cxx

    if _cxx() is None:
        pytest.skip("no C++ compiler for AOTInductor")
    g = torch.Generator().manual_seed(8)
    e, d, i, n = 8, 64, 32, 48
    lin = cpu_quant.from_int4_packed(quantize_int4(torch.randn(n, d, generator=g), 64))
    gu = cpu_quant.from_int4_packed(quantize_int4(torch.randn(e, 2 * i, d, generator=g), 64))
    dn = cpu_quant.from_int4_packed(quantize_int4(torch.randn(e, d, i, generator=g), 32))

    class Step(torch.nn.Module):
        def forward(self, x, lqw, lsc, lzp, gqw, gsc, gzp, dqw, dsc, dzp):
            h = torch.ops.kvscope.q4_linear(x[:, 16:], lqw, lsc, lzp, n, 64)
            s = torch.cat([h, h[:, :16]], -1)
            w, ids = torch.topk(F.softmax(s.float(), -1)[:, :e], 2)
            y = torch.ops.kvscope.q4_moe(s, ids, w, gqw, gsc, gzp, 64, dqw, dsc, dzp, 32, i)
            return y * 2, h

    x = torch.randn(3, 80, generator=g).to(torch.bfloat16)
    args = (x, lin.qw, lin.sc, lin.zp, gu.qw, gu.sc, gu.zp, dn.qw, dn.sc, dn.zp)
    want = Step()(*args)
    ep = torch.export.export(Step(), args)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "s.pt2"))
    got = torch._inductor.aoti_load_package(path)(*args)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_build_is_cached_and_keyed(tmp_path, monkeypatch):
    """One build per source/compiler/flags/CPU: a second load reuses the library; other
    flags build another."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        a = cpu_quant.build()
    except RuntimeError as e:
        pytest.skip(str(e))
    mtime = a.stat().st_mtime_ns
    assert cpu_quant.build() == a and a.stat().st_mtime_ns == mtime
    b = cpu_quant.build(("-DKVQ4_FORCE_SCALAR",))
    assert b != a and b.exists()
    assert ctypes.CDLL(str(b)).kvq4_isa  # loads


def test_missing_compiler_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_quant.build()
