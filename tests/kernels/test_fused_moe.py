"""fused_moe: Triton vs reference, and the reference vs transformers' experts module.

Tolerances: fp32 atol/rtol 1e-5 (GEMM sum order only). bf16: the kernel is compared with the fp32
math on the same bf16 weights/inputs at atol/rtol 3e-2 (it rounds the SiLU*up activations and
each expert's weighted output to bf16 once; the bf16 reference, like transformers, rounds after
every op and is held to the same bound). The fp32 reference equals transformers' module.
"""

import pytest
import torch
from transformers.models.glm_moe_dsa.configuration_glm_moe_dsa import GlmMoeDsaConfig
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaExperts

from kernels.fused_moe import fused_moe, reference_fused_moe


def _setup(T, k, E, D, I, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_gate_up = torch.randn(E, 2 * I, D, generator=g) * D**-0.5
    w_down = torch.randn(E, D, I, generator=g) * I**-0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # distinct per row
    weights = torch.rand(T, k, generator=g)
    to = lambda t: t.to(dtype).to(device)  # noqa: E731
    return to(x), to(w_gate_up), to(w_down), ids.to(device), weights.to(device)


@pytest.mark.parametrize("T,k,E,D,I", [(1, 3, 5, 40, 24), (7, 2, 9, 48, 40), (33, 4, 6, 24, 56)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(T, k, E, D, I, dtype, device, close):
    x, wgu, wd, ids, w = _setup(T, k, E, D, I, dtype, device)
    out = fused_moe(x, wgu, wd, ids, w)
    assert out.shape == x.shape and out.dtype == dtype
    ref32 = reference_fused_moe(x.float(), wgu.float(), wd.float(), ids, w)
    if dtype == torch.float32:
        close(out, ref32, 1e-5, 1e-5)
    else:
        close(out, ref32, 3e-2, 3e-2)
        close(reference_fused_moe(x, wgu, wd, ids, w), ref32, 3e-2, 3e-2)


def test_dropped_experts_and_idle_experts(device, close):
    """ids outside [0, E) contribute nothing; experts nobody picked are skipped."""
    x, wgu, wd, ids, w = _setup(6, 2, 8, 40, 24, torch.float32, device, seed=1)
    ids = ids % 3  # experts 3..7 idle
    ids[:, 1] = torch.where(ids[:, 0] == ids[:, 1], (ids[:, 1] + 1) % 3, ids[:, 1])
    ids[0, 1] = -1
    ids[4, 0] = 8  # == E: transformers' masked-expert sentinel
    out = fused_moe(x, wgu, wd, ids, w)
    close(out, reference_fused_moe(x, wgu, wd, ids, w), 1e-5, 1e-5)
    keep = ids.clone()
    keep[0, 1], keep[4, 0] = ids[0, 0], ids[4, 1]  # same expert twice with weight 0 instead
    w0 = w.clone()
    w0[0, 1] = w0[4, 0] = 0.0
    close(out, reference_fused_moe(x, wgu, wd, keep, w0), 1e-5, 1e-5)


def test_reference_is_transformers_experts():
    T, k, E, D, I = 7, 3, 6, 40, 24
    cfg = GlmMoeDsaConfig(
        hidden_size=D, moe_intermediate_size=I, n_routed_experts=E, num_hidden_layers=1
    )
    cfg._experts_implementation = "eager"
    experts = GlmMoeDsaExperts(cfg)
    x, wgu, wd, ids, w = _setup(T, k, E, D, I, torch.float32, torch.device("cpu"), seed=2)
    with torch.no_grad():
        experts.gate_up_proj.copy_(wgu)
        experts.down_proj.copy_(wd)
        tf = experts(x, ids, w)
    torch.testing.assert_close(reference_fused_moe(x, wgu, wd, ids, w), tf, atol=1e-6, rtol=1e-6)
