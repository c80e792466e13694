"""gqa_decode: Triton vs reference (decode rows, prefill rows via row_seq/row_limit, an empty
sequence, 1..3 splits), and the reference vs transformers' eager attention with repeat_kv.

Tolerances: fp32 atol/rtol 1e-5 (online softmax and sum order only); bf16 atol/rtol 2e-2 (the
output is rounded to bf16; on the GPU the softmax weights are too, for the PV product).
"""

from types import SimpleNamespace

import pytest
import torch
from transformers.models.glm4_moe.modeling_glm4_moe import eager_attention_forward

from kernels.gqa_decode import gqa_decode, reference_gqa_decode

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _setup(Hq, Hkv, D, lens, page_size, dtype, device, paged, seed=0):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(n, Hkv, D, generator=g).to(dtype) for n in lens]
    vs = [torch.randn(n, Hkv, D, generator=g).to(dtype) for n in lens]
    kc = paged(ks, page_size, device, seed=seed)
    vc = paged(vs, page_size, device, seed=seed)  # same seed: same slots and page table
    assert torch.equal(kc.page_table, vc.page_table)
    q = torch.randn(len(lens), Hq, D, generator=g).to(dtype).to(device)
    return q, kc, vc


@pytest.mark.parametrize(
    "Hq,Hkv,D,page_size",
    [(3, 1, 24, 1), (5, 5, 40, 16), (6, 2, 48, 64), (7, 1, 40, 16), (12, 4, 128, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(Hq, Hkv, D, page_size, dtype, device, paged, close):
    lens = [37, 0, 70, 1]  # one empty sequence (output 0), one single token
    q, kc, vc = _setup(Hq, Hkv, D, lens, page_size, dtype, device, paged)
    args = (q, kc.plane, vc.plane, kc.page_table, kc.seq_lens)
    ref = reference_gqa_decode(*args, scale=D**-0.5)
    atol, rtol = TOL[dtype]
    for splits in (None, 3):
        out = gqa_decode(*args, scale=D**-0.5, num_splits=splits)
        assert out.shape == q.shape and out.dtype == dtype
        close(out, ref, atol, rtol)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rows(dtype, device, paged, close):
    """A chunk of 5 tokens of sequence 1, each causal up to its own position."""
    Hq, Hkv, D = 6, 2, 40
    _, kc, vc = _setup(Hq, Hkv, D, [9, 50], 16, dtype, device, paged)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, Hq, D, generator=g).to(dtype).to(device)
    pos = torch.tensor([0, 1, 17, 48, 49])
    kw = dict(
        scale=D**-0.5,
        row_seq=torch.ones(5, dtype=torch.int32, device=device),
    )
    limit = (pos + 1).to(torch.int32).to(device)
    out = gqa_decode(q, kc.plane, vc.plane, kc.page_table, limit, **kw)
    ref = reference_gqa_decode(q, kc.plane, vc.plane, kc.page_table, limit, **kw)
    atol, rtol = TOL[dtype]
    close(out, ref, atol, rtol)


def test_reference_equals_transformers_eager(paged, close):
    torch.manual_seed(0)
    Hq, Hkv, D, n = 6, 2, 40, 23
    k, v = torch.randn(n, Hkv, D), torch.randn(n, Hkv, D)
    q = torch.randn(1, Hq, D)
    module = SimpleNamespace(num_key_value_groups=Hq // Hkv, training=False)
    dense, _ = eager_attention_forward(
        module,
        q[:, :, None],  # [1, Hq, 1, D]
        k.transpose(0, 1)[None],  # [1, Hkv, n, D]
        v.transpose(0, 1)[None],
        None,
        scaling=D**-0.5,
    )  # [1, 1, Hq, D]
    kc = paged([k], 16, torch.device("cpu"))
    vc = paged([v], 16, torch.device("cpu"))
    args = (q, kc.plane, vc.plane, kc.page_table, kc.seq_lens)
    close(reference_gqa_decode(*args, scale=D**-0.5), dense[0], 1e-5, 1e-5)
    close(gqa_decode(*args, scale=D**-0.5), dense[0], 1e-5, 1e-5)
