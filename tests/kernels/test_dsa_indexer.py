"""dsa_indexer: Triton scores vs reference, top-k by selected score values, and the reference
vs transformers' GlmMoeDsaIndexer on a tiny config.

Tolerances: scores fp32 atol/rtol 1e-5 (fp32 sum order only); bf16 inputs are multiplied in fp32
on both sides (products exact), so the same 1e-5 relative plus 1e-4 absolute. Top-k sets are
compared through the reference scores they select (ties make index order arbitrary) with 8
indexer heads (shared/TRAPS.md: fewer heads give many exact-zero ties).
"""

import pytest
import torch
from transformers.models.glm_moe_dsa.configuration_glm_moe_dsa import GlmMoeDsaConfig
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import (
    GlmMoeDsaIndexer,
    apply_rotary_pos_emb_interleave,
)

from kernels.dsa_indexer import (
    dsa_indexer_scores,
    dsa_indexer_topk,
    reference_dsa_indexer_scores,
    reference_dsa_indexer_topk,
)

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-5)}


def _setup(Hi, Di, lens, page_size, dtype, device, paged, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, Di, generator=g).to(dtype) for n in lens]
    cache = paged(keys, page_size, device, seed=seed)
    # query tokens: the last 3 of seq 0 (a prefill chunk) and the last one of every other seq
    seq, limit = [], []
    for b, n in enumerate(lens):
        for p in range(max(n - (3 if b == 0 else 1), 0), n):
            seq.append(b)
            limit.append(p + 1)
    T = len(seq)
    q = torch.randn(T, Hi, Di, generator=g).to(dtype).to(device)
    w = (torch.randn(T, Hi, generator=g) * Hi**-0.5).to(device)
    seq = torch.tensor(seq, dtype=torch.int32, device=device)
    limit = torch.tensor(limit, dtype=torch.int32, device=device)
    return q, w, cache, seq, limit


@pytest.mark.parametrize("Hi,Di,page_size", [(8, 40, 1), (3, 24, 16), (5, 48, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_match_reference(Hi, Di, page_size, dtype, device, paged, close):
    q, w, cache, seq, limit = _setup(Hi, Di, [37, 5, 70], page_size, dtype, device, paged)
    args = (q, w, cache.plane, cache.page_table, seq, limit)
    out = dsa_indexer_scores(*args, scale=Di**-0.5)
    ref = reference_dsa_indexer_scores(*args, scale=Di**-0.5)
    assert out.shape == (q.shape[0], 70) and out.dtype == torch.float32
    assert torch.equal(torch.isinf(out), torch.isinf(ref))  # same -inf mask
    atol, rtol = TOL[dtype]
    close(out, ref, atol, rtol)
    wider = dsa_indexer_scores(*args, scale=Di**-0.5, max_len=100)  # explicit max_len pads -inf
    close(wider[:, :70], out, 0, 0)
    assert torch.isinf(wider[:, 70:]).all()


@pytest.mark.parametrize("topk", [5, 100])
def test_topk_selects_best_scores(topk, device, paged):
    q, w, cache, seq, limit = _setup(8, 40, [37, 5, 70], 16, torch.float32, device, paged)
    args = (q, w, cache.plane, cache.page_table, seq, limit)
    idx = dsa_indexer_topk(*args, scale=40**-0.5, topk=topk)
    ref_scores = reference_dsa_indexer_scores(*args, scale=40**-0.5)
    ref_idx = reference_dsa_indexer_topk(*args, scale=40**-0.5, topk=topk)
    assert idx.dtype == torch.int32 and idx.shape == (q.shape[0], min(topk, 70))
    for t in range(q.shape[0]):
        n_valid = min(topk, int(limit[t]))
        assert (idx[t, :n_valid] >= 0).all() and (idx[t, n_valid:] == -1).all()
        assert (idx[t, :n_valid] < limit[t]).all()
        got = ref_scores[t, idx[t, :n_valid].long()].sort().values
        want = ref_scores[t, ref_idx[t, :n_valid].long()].sort().values
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_matches_transformers_indexer(paged):
    """Full prefill through transformers' indexer vs our paged reference on the same keys."""
    torch.manual_seed(0)
    S, topk = 12, 5
    cfg = GlmMoeDsaConfig(
        hidden_size=48,
        q_lora_rank=32,
        index_n_heads=8,
        index_head_dim=40,
        qk_rope_head_dim=16,
        index_topk=topk,
        num_hidden_layers=1,
        num_attention_heads=4,
    )
    idx_mod = GlmMoeDsaIndexer(cfg, 0).eval()
    with torch.no_grad():
        idx_mod.k_norm.weight.normal_(1.0, 0.1)
        idx_mod.k_norm.bias.normal_(0.0, 0.1)
    h = torch.randn(1, S, 48)
    q_resid = torch.randn(1, S, 32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    freqs = torch.arange(S)[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, S, 16]
    cos, sin = emb.cos(), emb.sin()
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None]  # [1, S, S]
    with torch.no_grad():
        tf_idx = idx_mod(h, q_resid, (cos, sin), causal, None)[0]  # [S, topk]
        # the indexer's q / k / weights, as its forward builds them
        q = idx_mod.wq_b(q_resid).view(1, S, 8, 40)
        k = idx_mod.k_norm(idx_mod.wk(h)).unsqueeze(2)
        q_rot, k_rot = apply_rotary_pos_emb_interleave(
            q[..., :16], k[..., :16], cos, sin, unsqueeze_dim=2
        )
        q = torch.cat([q_rot, q[..., 16:]], dim=-1)[0]  # [S, 8, 40]
        k = torch.cat([k_rot, k[..., 16:]], dim=-1)[0, :, 0]  # [S, 40]
        w = idx_mod.weights_proj(h).float()[0] * 8**-0.5  # [S, 8]
    cache = paged([k], 16, torch.device("cpu"))
    seq = torch.zeros(S, dtype=torch.int32)
    limit = torch.arange(1, S + 1, dtype=torch.int32)
    args = (q, w, cache.plane, cache.page_table, seq, limit)
    scores = reference_dsa_indexer_scores(*args, scale=40**-0.5)
    ours = reference_dsa_indexer_topk(*args, scale=40**-0.5, topk=topk)
    kernel = dsa_indexer_topk(*args, scale=40**-0.5, topk=topk)
    for t in range(S):
        n_valid = min(topk, t + 1)
        tf_valid = tf_idx[t][tf_idx[t] <= t].long()  # transformers also picks masked positions
        assert len(tf_valid) == n_valid
        want = scores[t, tf_valid].sort().values
        for sel in (ours, kernel):
            got = scores[t, sel[t, :n_valid].long()].sort().values
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
