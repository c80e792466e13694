"""mla_decode: Triton vs reference (decode rows and prefill rows with their own selections,
-1 padding, causal row limits, 1..3 splits), and the absorbed reference vs transformers' dense
eager attention on expanded K/V.

Tolerances: fp32 atol/rtol 1e-5 (online softmax and sum order only). bf16 atol/rtol 2e-2: q_lat
and the output pass through bf16 matmuls (the same ones on both sides; on the GPU the kernel also
rounds the softmax weights to bf16 for the PV product).
"""

from types import SimpleNamespace

import pytest
import torch
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import eager_attention_forward

from kernels.mla_decode import (
    mla_decode,
    mla_sparse_attention,
    reference_mla_decode,
    reference_mla_sparse_attention,
    split_kv_b,
)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _selection(limit: int, K: int, g: torch.Generator) -> torch.Tensor:
    """K positions in [0, limit) without repeats, -1 padded, the -1s scattered."""
    n = min(K, limit)
    sel = torch.cat([torch.randperm(limit, generator=g)[:n], torch.full((K - n,), -1)])
    return sel[torch.randperm(K, generator=g)]


def _setup(H, dn, L, R, dv, lens, page_size, K, dtype, device, paged, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn(n, L + R, generator=g).to(dtype) for n in lens]
    cache = paged(lat, page_size, device, seed=seed)
    B = len(lens)
    q_nope = torch.randn(B, H, dn, generator=g).to(dtype).to(device)
    q_rope = torch.randn(B, H, R, generator=g).to(dtype).to(device)
    w_uk = (torch.randn(H, dn, L, generator=g) * dn**-0.5).to(dtype).to(device)
    w_uv = (torch.randn(H, dv, L, generator=g) * L**-0.5).to(dtype).to(device)
    topk = torch.stack([_selection(n, K, g) for n in lens]).to(torch.int32).to(device)
    return cache, q_nope, q_rope, w_uk, w_uv, topk


@pytest.mark.parametrize(
    "H,dn,L,R,dv,page_size",
    [(5, 24, 40, 16, 24, 1), (3, 16, 48, 24, 40, 16), (7, 32, 64, 16, 16, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(H, dn, L, R, dv, page_size, dtype, device, paged, close):
    lens, K = [37, 5, 70], 24  # K shorter than two contexts, longer than one (-1 padded)
    cache, qn, qr, w_uk, w_uv, topk = _setup(
        H, dn, L, R, dv, lens, page_size, K, dtype, device, paged
    )
    topk[1, 0] = 10**6  # past the page table: ignored
    scale = (dn + R) ** -0.5
    args = (qn, qr, cache.plane, cache.page_table, topk, w_uk, w_uv)
    ref = reference_mla_decode(*args, scale=scale)
    atol, rtol = TOL[dtype]
    for splits in (None, 1, 3):  # default, one split, splits with no valid key
        out = mla_decode(*args, scale=scale, num_splits=splits)
        assert out.shape == (3, H, dv) and out.dtype == dtype
        close(out, ref, atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rows_with_own_selection(dtype, device, paged, close):
    """T tokens of sequence 1 (row_seq), each with its own selection and causal limit; some
    selections name future positions, which row_limit must drop."""
    H, dn, L, R, dv = 5, 24, 40, 16, 24
    cache, *_ = _setup(H, dn, L, R, dv, [9, 50], 16, 8, dtype, device, paged)
    g = torch.Generator().manual_seed(3)
    T, K = 6, 20
    pos = torch.tensor([0, 1, 17, 30, 48, 49])
    sel = torch.stack([_selection(50, K, g) for _ in range(T)])  # may include p > pos
    q_lat = torch.randn(T, H, L, generator=g).to(dtype).to(device)
    q_rope = torch.randn(T, H, R, generator=g).to(dtype).to(device)
    args = (q_lat, q_rope, cache.plane, cache.page_table, sel.to(torch.int32).to(device))
    kw = dict(
        scale=0.2,
        row_seq=torch.ones(T, dtype=torch.int32, device=device),
        row_limit=(pos + 1).to(torch.int32).to(device),
    )
    out = mla_sparse_attention(*args, **kw)
    ref = reference_mla_sparse_attention(*args, **kw)
    assert out.dtype == torch.float32 and out.shape == (T, H, L)
    atol, rtol = TOL[dtype]
    close(out, ref, atol, rtol)
    # a row whose selection is all past its limit (or all -1) attends to nothing: 0
    empty = sel.clone()
    empty[0] = torch.where(empty[0] > 0, empty[0], -1)
    args = (q_lat, q_rope, cache.plane, cache.page_table, empty.to(torch.int32).to(device))
    out = mla_sparse_attention(*args, **kw)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_absorbed_reference_equals_dense_transformers(paged, close):
    """reference_mla_decode == transformers' eager attention over kv_b-expanded keys/values with
    the DSA mask, for one decode query."""
    torch.manual_seed(0)
    H, dn, L, R, dv, n = 3, 16, 40, 16, 24, 29
    kv_b = torch.randn(H * (dn + dv), L) * L**-0.5  # kv_b_proj.weight
    c = torch.randn(n, L)  # kv_a_layernorm(compressed_kv)
    k_rot = torch.randn(n, R)
    q_nope, q_rope = torch.randn(1, H, dn), torch.randn(1, H, R)
    sel = torch.tensor([[3, 28, 0, 11, -1, 17, 5, -1]], dtype=torch.int32)
    scale = (dn + R) ** -0.5
    # dense, as GlmMoeDsaAttention.expand_kv + eager_attention_forward
    kv = (c @ kv_b.T).view(n, H, dn + dv).transpose(0, 1)  # [H, n, dn + dv]
    key = torch.cat([kv[..., :dn], k_rot.expand(H, n, R)], dim=-1)[None]  # [1, H, n, dn + R]
    value = kv[..., dn:][None]  # [1, H, n, dv]
    query = torch.cat([q_nope, q_rope], dim=-1).transpose(0, 1)[None]  # [1, H, 1, dn + R]
    mask = torch.full((1, 1, 1, n), torch.finfo(torch.float32).min)
    mask[..., sel[0][sel[0] >= 0].long()] = 0.0
    module = SimpleNamespace(num_key_value_groups=1, training=False)
    dense, _ = eager_attention_forward(module, query, key, value, mask, scaling=scale)
    # absorbed, from the paged latent plane
    cache = paged([torch.cat([c, k_rot], dim=-1)], 16, torch.device("cpu"))
    w_uk, w_uv = split_kv_b(kv_b, H, dn, dv)
    out = reference_mla_decode(
        q_nope, q_rope, cache.plane, cache.page_table, sel, w_uk, w_uv, scale=scale
    )
    close(out, dense[0], 1e-5, 1e-5)  # dense [1, 1, H, dv] -> [1, H, dv]
    kern = mla_decode(q_nope, q_rope, cache.plane, cache.page_table, sel, w_uk, w_uv, scale=scale)
    close(kern, dense[0], 1e-5, 1e-5)
