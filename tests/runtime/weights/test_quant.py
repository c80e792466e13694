"""Quantized weights (bitsandbytes NF4 / int8, kvscope int4) and their quality on a tiny model.

Quality: teacher-forced next-token distributions of the quantized model against --quant none on
the tiny GLM-4.x checkpoint (random weights, fp32, 128 tokens in two windows of 64). Measured on
this machine: int8 KL 0.004 / top-1 0.94, nf4 0.10 / 0.67, int4 0.08 / 0.70. Thresholds, with
margin: int8 KL < 0.02 and top-1 >= 0.85; nf4 and int4 KL < 0.25 and top-1 >= 0.5; int8 beats
both 4-bit formats. Random tiny models are a harsh test (no redundancy, sharp logits);
docs/quantization.md has the table and the demo-model numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.quant_eval import quant_quality
from runtime.models.base import WeightReader
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.quant import ExpertFormat, quantize_weight

THRESHOLDS = {"int8": (0.02, 0.85), "nf4": (0.25, 0.5), "int4": (0.25, 0.5)}


def _w(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.15, torch.randn(5, k, generator=g)


def _rel(y, ref):
    return float((y - ref).norm() / ref.norm())


@pytest.mark.parametrize("method,bound", [("int8", 0.03), ("nf4", 0.15), ("int4", 0.15)])
@pytest.mark.parametrize("shape", [(72, 48), (40, 256), (24, 41)])
def test_quantized_linear_is_close(method, bound, shape):
    """[72, 48]: bitsandbytes' own CPU NF4 path is 40 % off there (blocks of 64 cross rows);
    quant_bnb dequantizes the flattened weight instead."""
    w, x = _w(*shape)
    q = quantize_weight(w, method)
    # kvscope's VNNI layouts pad N to 16 rows and K to 32 columns (tiny shapes here)
    padded = -(-shape[0] // 16) * 16 * -(-shape[1] // 32) * 32
    assert q.shape == tuple(shape) and q.device == w.device
    assert q.nbytes < max(w.numel() * 4 / 3, padded * 1.2)
    y = q(x)
    assert y.shape == (5, shape[0]) and y.dtype == x.dtype
    assert _rel(y, x @ w.t()) < bound


@pytest.mark.parametrize("method", ["none", "int8", "nf4", "int4"])
def test_expert_format_roundtrip(method):
    d, i = 48, 24
    fmt = ExpertFormat(method, torch.float32, d, i)
    (gu, x), (dn, _) = _w(2 * i, d, 1), _w(d, i, 2)
    rec = fmt.encode(gu, dn)
    spec = fmt.spec()
    assert set(rec) == set(spec)
    for k, (shape, dt) in spec.items():
        assert tuple(rec[k].shape) == shape and rec[k].dtype == dt, k
    assert fmt.nbytes == sum(t.numel() * t.element_size() for t in rec.values())
    copied = {k: v.clone() for k, v in rec.items()}  # as a cache slot would hold it
    wgu, wdn = fmt.decode(copied)
    from runtime.models.layers import linear

    h = linear(x, wgu)
    resident = quantize_weight(gu, method)
    if hasattr(wgu, "dequantize") and hasattr(resident, "dequantize"):  # the same weight (up to
        # the scales' bf16 rounding in torch's int8 kernel layout: the record's CPU path)
        a, b = wgu.dequantize().float(), resident.dequantize().float()
        torch.testing.assert_close(a, b, rtol=4e-3, atol=1e-6)
    if type(resident).__module__.endswith("vnni"):  # int8 activations there (kernels/cpu_quant)
        assert _rel(h, linear(x, resident)) < 0.02
    else:
        assert torch.equal(h, linear(x, resident))
    assert _rel(h, x @ gu.t()) < (1e-6 if method == "none" else 0.15)
    assert linear(h[:, :i], wdn).shape == (5, d)


def test_reader_quantizes_linear_weights_only(tiny_dsa):
    class Plan:
        quant, keep_fp8, fp8_block = "int4", False, (128, 128)

    w = WeightReader(Checkpoint(tiny_dsa), torch.float32, torch.device("cpu"), Plan())
    p = "model.layers.1"
    assert callable(w(f"{p}.self_attn.q_a_proj.weight", (40, 48)))
    assert callable(w(f"{p}.mlp.shared_experts.down_proj.weight", (48, 24)))
    for name, shape in [
        (f"{p}.mlp.gate.weight", (8, 48)),  # router
        (f"{p}.self_attn.kv_b_proj.weight", (3 * 22, 24)),  # viewed per head, not linear()
        (f"{p}.input_layernorm.weight", (48,)),
        ("lm_head.weight", (211, 48)),
    ]:
        assert isinstance(w(name, shape), torch.Tensor), name
    wp = "model.layers.0.self_attn.indexer.weights_proj.weight"
    assert isinstance(w(wp, (8, 48), torch.float32), torch.Tensor)


def test_quality_against_full_precision(tiny_glm4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 200, (128,), generator=g).tolist()
    res = quant_quality(tiny_glm4, ids, window=64, total=128)
    for method, (max_kl, min_top1) in THRESHOLDS.items():
        r = res[method]
        assert r["tokens"] == 128
        assert r["kl"] < max_kl and r["top1"] >= min_top1, (method, r)
    assert res["int8"]["kl"] < min(res["nf4"]["kl"], res["int4"]["kl"])


def test_int4_engine_runs_the_reference_op(tiny_glm4):
    """Resident int4 experts take the fused op (torch reference on CPU); the per-expert loop
    over the same weights gives the same output."""
    from runtime.engine import Engine, EngineConfig

    e = Engine(tiny_glm4, EngineConfig(device="cpu", dtype="float32", quant="int4"))
    experts = e.model.layers[1].mlp.experts
    assert experts.fused is not None and len(experts.gate_up) == 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g)
    weights, ids = e.model.layers[1].mlp.router(x)
    fused = experts(x, weights, ids)
    loop = experts._loop(x, weights, ids, lambda i: (experts.gate_up[i], experts.down[i]))
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    assert F.cosine_similarity(fused.flatten(), loop.flatten(), dim=0) > 0.9999


DEMO = Path(__file__).resolve().parents[3] / "assets" / "demo"
DEMO_THRESHOLDS = {"int8": (0.003, 0.95), "nf4": (0.015, 0.9), "int4": (0.015, 0.9)}


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="no demo model")
def test_quality_on_the_demo_model():
    """The trained demo model over its held-out text (256 tokens, 2 windows of 128). Measured:
    int8 KL 0.0006 / top-1 0.988, nf4 0.0047 / 0.953, int4 0.0039 / 0.969."""
    from runtime.tokenizer import Tokenizer

    text = (DEMO.parent / "demo_heldout.txt").read_text()
    ids = Tokenizer(DEMO).encode(text)
    res = quant_quality(DEMO, ids, window=128, total=256)
    for method, (max_kl, min_top1) in DEMO_THRESHOLDS.items():
        r = res[method]
        assert r["kl"] < max_kl and r["top1"] >= min_top1, (method, r)


@pytest.mark.parametrize("shape", [(64, 1024), (300, 77), (5, 3)])
def test_int8_rows_are_bitsandbytes_bytes(shape):
    """The CPU int8 path quantizes rows in plain torch (no bitsandbytes import): the same bytes
    and scales as bitsandbytes' int8_vectorwise_quant."""
    from runtime.weights.quant import int8_rows
    from runtime.weights.quant_bnb import Int8Weight

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    rec = Int8Weight.quantize(w)
    q, s = int8_rows(w)
    assert torch.equal(rec.cb, q) and torch.equal(rec.scb, s)


@pytest.mark.parametrize("method, group", [("int8", 128), ("int4", 32)])
def test_large_weight_quantized_in_row_chunks_is_the_same(monkeypatch, method, group):
    """A weight above ROW_CHUNK rows (the LM head) is quantized chunk by chunk (bounded load
    memory): the same weight and outputs as quantizing it whole."""
    from kernels import cpu_quant
    from runtime.weights import quant

    if not cpu_quant.available():
        pytest.skip(f"kvscope VNNI kernels unavailable: {cpu_quant.unavailable_reason()}")
    w = torch.randn(200, 96, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 96)
    whole = quant.quantize_weight(w, method, group=group)
    monkeypatch.setattr(quant, "ROW_CHUNK", 64)
    chunked = quant.quantize_weight(w, method, group=group)
    assert type(chunked) is type(whole) and chunked.shape == whole.shape == (200, 96)
    assert torch.equal(chunked.dequantize(), whole.dequantize())
    assert torch.equal(chunked(x), whole(x))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_chunked_expert_load_is_the_same(method):
    """Routed experts read and quantized EXPERT_CHUNK at a time (a load never holds a layer's
    whole stack in the compute dtype): the same stacks as quantizing the whole stack."""
    from kernels import cpu_quant
    from runtime.weights import quant

    if not cpu_quant.available():
        pytest.skip(f"kvscope VNNI kernels unavailable: {cpu_quant.unavailable_reason()}")
    g = torch.Generator().manual_seed(2)
    e, d, i = 19, 64, 32  # 19: a partial last chunk
    gu, dn = torch.randn(e, 2 * i, d, generator=g), torch.randn(e, d, i, generator=g)
    reads = []

    def read(lo, hi):
        reads.append((lo, hi))
        return gu[lo:hi], dn[lo:hi]

    got = quant.chunked_resident_experts(read, e, method, "cpu")
    want = quant.resident_experts(gu, dn, method)
    assert max(hi - lo for lo, hi in reads) <= quant.EXPERT_CHUNK and reads[-1][1] == e
    for name in ("gate_up", "down"):
        a, b = got[name], want[name]
        assert type(a) is type(b) and len(a) == len(b) == e
        for x in (0, 8, 18):
            assert torch.equal(a[x].dequantize(), b[x].dequantize())
    assert quant.chunked_resident_experts(read, e, "none", "cpu") is None
