"""attn_combine: Triton vs reference (fp32 atol/rtol 1e-6), and that merging splits of a softmax
gives the unsplit softmax."""

import torch

from kernels.attn_combine import EMPTY_MAX, attn_combine, reference_attn_combine


def _partials(scores: torch.Tensor, values: torch.Tensor, cuts: list[int]):
    """Exact split partials of softmax(scores) @ values. scores [N, H, K], values [N, K, Dv]."""
    acc, m, l = [], [], []
    for a, b in zip([0, *cuts], [*cuts, scores.shape[-1]], strict=True):
        s = scores[..., a:b]
        if s.shape[-1] == 0:
            mx = torch.full(s.shape[:-1], EMPTY_MAX)
            acc.append(torch.zeros(*s.shape[:-1], values.shape[-1]))
            m.append(mx)
            l.append(torch.zeros_like(mx))
            continue
        mx = s.amax(-1)
        p = torch.exp(s - mx[..., None])  # [N, H, b - a]
        acc.append(torch.einsum("nhk,nkd->nhd", p, values[:, a:b]))
        m.append(mx)
        l.append(p.sum(-1))
    return torch.stack(acc, 2), torch.stack(m, 2), torch.stack(l, 2)


def test_merge_equals_softmax(device, close):
    g = torch.Generator().manual_seed(0)
    N, H, K, Dv = 3, 5, 30, 40
    scores = torch.randn(N, H, K, generator=g) * 4
    values = torch.randn(N, K, Dv, generator=g)
    acc, m, l = _partials(scores, values, [7, 7, 19])  # one empty split
    full = torch.einsum("nhk,nkd->nhd", torch.softmax(scores, -1), values)
    out = attn_combine(acc.to(device), m.to(device), l.to(device), torch.float32)
    close(out, full, 1e-6, 1e-5)
    close(out, reference_attn_combine(acc, m, l, torch.float32), 1e-6, 1e-6)
    out16 = attn_combine(acc.to(device), m.to(device), l.to(device), torch.bfloat16)
    assert torch.equal(out16.cpu(), out.cpu().to(torch.bfloat16))  # rounds to nearest even


def test_rows_without_keys_are_zero(device):
    acc = torch.zeros(2, 3, 4, 24, device=device)
    m = torch.full((2, 3, 4), EMPTY_MAX, device=device)
    l = torch.zeros(2, 3, 4, device=device)
    out = attn_combine(acc, m, l, torch.float32)
    assert torch.equal(out, torch.zeros(2, 3, 24, device=device))
