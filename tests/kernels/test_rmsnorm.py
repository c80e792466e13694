"""rmsnorm: Triton vs reference, reference vs transformers' RMSNorm.

Tolerances: fp32 atol 1e-6 / rtol 1e-5 (only the fp32 sum order differs); bf16 rtol 2^-7 * 2
(one bf16 rounding may land on the other side) atol 1e-5. The reference is bit-identical to
transformers' module (same ops).
"""

import pytest
import torch
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRMSNorm
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaRMSNorm

from kernels.rmsnorm import reference_rmsnorm, rmsnorm

TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 1.6e-2)}


@pytest.mark.parametrize("shape", [(1, 24), (7, 40), (3, 5, 48), (2, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(shape, dtype, with_residual, device, close):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(device)
    res = torch.randn(shape, generator=g).to(dtype).to(device) if with_residual else None
    out, new_res = rmsnorm(x, w, 1e-5, res)
    ref, ref_res = reference_rmsnorm(x, w, 1e-5, res)
    atol, rtol = TOL[dtype]
    assert out.dtype == ref.dtype and out.shape == x.shape
    close(out, ref, atol, rtol)
    assert torch.equal(new_res, ref_res)  # x + residual rounds identically
    if not with_residual:
        assert new_res is x


def test_strided_rows_and_mixed_weight_dtype(device, close):
    g = torch.Generator().manual_seed(2)
    big = torch.randn(6, 100, generator=g).to(torch.bfloat16).to(device)
    x = big[::2, 10:50]  # [3, 40], row stride 200
    w = torch.randn(40, generator=g).to(device)  # fp32 weight: output promotes to fp32
    out, _ = rmsnorm(x, w)
    ref, _ = reference_rmsnorm(x, w)
    assert out.dtype == torch.float32
    close(out, ref, 1e-5, 1.6e-2)


@pytest.mark.parametrize("cls", [GlmMoeDsaRMSNorm, Glm4MoeRMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_transformers(cls, dtype):
    g = torch.Generator().manual_seed(3)
    mod = cls(40, eps=1e-6).to(dtype)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(40, generator=g))
        x = torch.randn(5, 40, generator=g).to(dtype)
        assert torch.equal(reference_rmsnorm(x, mod.weight, 1e-6)[0], mod(x))
