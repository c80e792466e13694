"""int4_moe: Triton (w4a16, dequantized in registers) vs its torch reference, and the int4 format.

Tolerances: fp32 atol/rtol 1e-5 (both sides use the same dequantized fp32 weights; only the GEMM
sum order differs). fp16 5e-3 and bf16 3e-2 against the fp32 reference: the kernel rounds the
dequantized weights, the SiLU * up activations and each weighted expert output to the activation
dtype once, as kernels/fused_moe does (same bf16 bound as tests/kernels/test_fused_moe.py).
Shapes cover a group that is the whole (small) input dim and not a multiple of BLOCK_K, groups of
128 with a partial last group, and an odd input dim (last byte half used).
"""

import pytest
import torch

from kernels.fused_moe import reference_fused_moe
from kernels.int4_moe import (
    Int4Packed,
    dequantize_int4,
    int4_moe,
    quantize_int4,
    reference_int4_moe,
)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _setup(T, k, E, D, I, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    wgu = torch.randn(E, 2 * I, D, generator=g) * D**-0.5
    wd = torch.randn(E, D, I, generator=g) * I**-0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    gu, dn = quantize_int4(wgu), quantize_int4(wd)
    to = lambda p: Int4Packed(*(t.to(device) for t in p[:3]), p.in_features, p.group)  # noqa: E731
    return x.to(device), to(gu), to(dn), ids.to(device), weights.to(device)


@pytest.mark.parametrize(
    "T,k,E,D,I,dtypes",
    [
        (1, 3, 5, 48, 24, (torch.float32, torch.bfloat16, torch.float16)),  # G = D = 48
        (6, 2, 4, 160, 40, (torch.float32, torch.bfloat16)),  # G = 128, last group of 32
        (3, 2, 3, 64, 41, (torch.float32, torch.float16)),  # odd I: half-used last byte
    ],
)
def test_matches_reference(T, k, E, D, I, dtypes, device, close):
    x, gu, dn, ids, w = _setup(T, k, E, D, I, device)
    ref32 = reference_int4_moe(x, gu, dn, ids, w)
    for dtype in dtypes:
        out = int4_moe(x.to(dtype), gu, dn, ids, w)
        assert out.shape == x.shape and out.dtype == dtype
        close(out, ref32, TOL[dtype], TOL[dtype])


def test_dropped_and_idle_experts(device, close):
    """ids outside [0, E) contribute nothing; experts nobody picked are skipped."""
    x, gu, dn, ids, w = _setup(5, 2, 6, 48, 24, device, seed=1)
    ids = ids % 2
    ids[:, 1] = 1 - ids[:, 0]
    ids[0, 1], ids[3, 0] = -1, 6
    out = int4_moe(x, gu, dn, ids, w)
    close(out, reference_int4_moe(x, gu, dn, ids, w), 1e-5, 1e-5)
    w0 = w.clone()
    w0[0, 1] = w0[3, 0] = 0.0
    keep = ids.clone()
    keep[0, 1], keep[3, 0] = 1 - keep[0, 0], 1 - keep[3, 1]
    close(out, reference_int4_moe(x, gu, dn, keep, w0), 1e-5, 1e-5)


def test_reference_is_fused_reference_on_dequantized_weights():
    x, gu, dn, ids, w = _setup(7, 3, 6, 160, 24, torch.device("cpu"), seed=2)
    ref = reference_fused_moe(x, dequantize_int4(gu), dequantize_int4(dn), ids, w)
    assert torch.equal(reference_int4_moe(x, gu, dn, ids, w), ref)


@pytest.mark.parametrize("shape", [(5, 48), (3, 7, 200), (4, 41), (2, 128)])
def test_quantize_roundtrip_error_is_half_a_step(shape):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    w[0, :] = 0.0  # all-zero groups
    w[-1, : min(8, shape[-1])] = 0.7  # a constant run
    p = quantize_int4(w)
    K = shape[-1]
    G = min(128, K)
    assert p.group == G and p.in_features == K
    assert p.q.shape == (*shape[:-1], -(-K // 2)) and p.q.dtype == torch.uint8
    assert p.scales.shape == p.zeros.shape == (*shape[:-1], -(-K // G))
    assert ((p.zeros >= 0) & (p.zeros <= 15) & (p.zeros == p.zeros.round())).all()
    deq = dequantize_int4(p)
    step = p.scales.float().repeat_interleave(G, -1)[..., :K]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(deq[0], torch.zeros_like(deq[0]))
    if K % 2:  # the unused high nibble of the last byte stays 0
        assert (p.q[..., -1] >> 4 == 0).all()
