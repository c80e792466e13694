"""rope: Triton vs reference, reference vs transformers' rotary functions.

Tolerances: fp32 atol/rtol 1e-6/1e-5. bf16: the kernel computes in fp32 and rounds once, so it is
compared with the fp32 math on the same bf16 inputs at one bf16 rounding (atol 1e-2 at |x| ~ 4,
rtol 2^-8 * 2); transformers' bf16 (rounding after each product) is checked against the same
fp32 math at twice that. The references equal transformers' functions exactly.
"""

import pytest
import torch
from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

from kernels.rope import reference_rope_interleave, reference_rope_neox, rope_interleave, rope_neox


def _cos_sin(positions: torch.Tensor, rot_dim: int, base: float = 10000.0):
    """transformers' default rotary embedding: cos/sin [T, rot_dim] = cat(freqs, freqs)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    freqs = positions[:, None].float() * inv_freq  # [T, rot_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _check(out, ref_fp32, dtype, close):
    if dtype == torch.float32:
        close(out, ref_fp32, 1e-6, 1e-5)
    else:
        close(out, ref_fp32, 1e-2, 8e-3)


@pytest.mark.parametrize("T,H,R", [(5, 3, 16), (1, 7, 64), (9, 1, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleave_matches_reference(T, H, R, dtype, device, close):
    g = torch.Generator().manual_seed(T * H + R)
    base = (torch.randn(T, H, R + 8, generator=g) * 4).to(dtype)
    x = base[:, :, 8:].to(device)  # rope slice of a wider head: strided rows
    pos = torch.randint(0, 4096, (T,), generator=g)
    cos, sin = (t.to(dtype).to(device) for t in _cos_sin(pos, R))
    out = rope_interleave(x, cos, sin)
    ref32 = reference_rope_interleave(x.float(), cos.float(), sin.float())
    assert out.dtype == dtype and out.shape == x.shape
    _check(out, ref32, dtype, close)
    # 2-D input ([T, R], e.g. the MLA k_rot) takes the same path
    close(rope_interleave(x[:, 0], cos, sin), out[:, 0], 0, 0)


@pytest.mark.parametrize("T,H,D,R", [(5, 3, 40, 20), (4, 5, 48, 48), (3, 2, 128, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neox_matches_reference(T, H, D, R, dtype, device, close):
    g = torch.Generator().manual_seed(T * H + D)
    x = (torch.randn(T, H, D, generator=g) * 4).to(dtype).to(device)
    pos = torch.randint(0, 4096, (T,), generator=g)
    cos, sin = (t.to(dtype).to(device) for t in _cos_sin(pos, R))
    out = rope_neox(x, cos, sin)
    ref32 = reference_rope_neox(x.float(), cos.float(), sin.float())
    _check(out, ref32, dtype, close)
    assert torch.equal(out[..., R:], x[..., R:])  # pass-through dims untouched


@pytest.mark.parametrize("interleave", [True, False])
def test_position_tables(interleave, device, close):
    g = torch.Generator().manual_seed(5)
    T, H, R = 6, 3, 16
    x = torch.randn(T, H, R, generator=g).to(device)
    table_cos, table_sin = (t.to(device) for t in _cos_sin(torch.arange(100), R))
    pos = torch.tensor([0, 99, 3, 3, 50, 7], device=device)
    fn = rope_interleave if interleave else rope_neox
    out = fn(x, table_cos, table_sin, positions=pos)
    close(out, fn(x, table_cos[pos], table_sin[pos]), 0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_are_transformers(dtype, close):
    g = torch.Generator().manual_seed(6)
    T, H, R, D, Rn = 5, 3, 16, 40, 20
    pos = torch.randint(0, 4096, (T,), generator=g)
    # GLM-5 layout: transformers takes [B, H, T, R] and cos [B, T, R]
    q = torch.randn(T, H, R, generator=g).to(dtype)
    cos, sin = (t.to(dtype) for t in _cos_sin(pos, R))
    q_tf, _ = apply_rotary_pos_emb_interleave(
        q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos[None], sin[None]
    )
    assert torch.equal(reference_rope_interleave(q, cos, sin), q_tf[0].transpose(0, 1))
    # glm4_moe layout, partial rotary
    k = torch.randn(T, H, D, generator=g).to(dtype)
    cos, sin = (t.to(dtype) for t in _cos_sin(pos, Rn))
    _, k_tf = apply_rotary_pos_emb(
        k.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    assert torch.equal(reference_rope_neox(k, cos, sin), k_tf[0].transpose(0, 1))
    if dtype == torch.bfloat16:  # transformers' bf16 vs the fp32 math: within 2 roundings
        ref32 = reference_rope_neox(k.float(), cos.float(), sin.float())
        close(k_tf[0].transpose(0, 1), ref32, 2e-2, 1.6e-2)
