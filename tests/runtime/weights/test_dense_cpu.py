"""oneDNN-prepacked bf16 linears (runtime/weights/dense_cpu.py): same bits as F.linear, used only
where the CPU has oneDNN bf16 kernels, and a packed engine emits the plain engine's tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.engine import Engine, EngineConfig
from runtime.weights import dense_cpu
from runtime.weights.dense_cpu import OnednnBf16Linear
from runtime.weights.linear import linear

needs_onednn = pytest.mark.skipif(
    not dense_cpu.available(), reason="no oneDNN bf16 kernels on this CPU: weights stay plain"
)


@needs_onednn
@pytest.mark.parametrize("shape", [(72, 48), (24, 41), (1024, 512), (4096, 1024)])
@pytest.mark.parametrize("tokens", [1, 9])
def test_packed_linear_is_bit_identical_to_f_linear(shape, tokens):
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    b = torch.randn(shape[0], generator=g).to(torch.bfloat16)
    x = torch.randn(2, tokens, shape[1], generator=g).to(torch.bfloat16)
    p = OnednnBf16Linear(w)
    assert p.shape == shape and torch.equal(p.dequantize(), w)
    assert torch.equal(linear(x, p), F.linear(x, w))
    assert torch.equal(linear(x, p, b), F.linear(x, w, b))  # bias fused: one rounding
    xf = x.float()  # fp32 activations: rounded to bf16 on the way in, result back in fp32
    assert linear(xf, p).dtype == torch.float32
    assert torch.equal(linear(xf, p), F.linear(x, w).float())


def test_packing_can_be_turned_off(monkeypatch):
    dense_cpu.available.cache_clear()
    monkeypatch.setenv("KVSCOPE_ONEDNN_PACK", "0")
    try:
        assert not dense_cpu.available()
    finally:
        dense_cpu.available.cache_clear()


@needs_onednn
def test_packed_engine_emits_the_plain_engines_tokens(tiny_glm4, monkeypatch):
    """bf16, eager: every dense projection, shared and routed expert and the LM head packed;
    the same greedy tokens bit for bit. A packed model never takes the compiled CPU step."""
    conf = EngineConfig(device="cpu", dtype="bfloat16", page_size=4, cpu_graph="off")
    prompts = ([5, 6, 7], list(range(10, 31)))
    plain = Engine(tiny_glm4, conf)
    assert isinstance(plain.model.lm_head, torch.Tensor)  # tiny: below PACK_MIN_BYTES
    want = [plain.generate(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
    monkeypatch.setattr(dense_cpu, "PACK_MIN_BYTES", 0)
    packed = Engine(tiny_glm4, conf)
    m = packed.model
    assert isinstance(m.lm_head, OnednnBf16Linear) and isinstance(
        m.layers[0].attn.wq, OnednnBf16Linear
    )
    assert all(isinstance(w, OnednnBf16Linear) for w in m.layers[1].mlp.experts.gate_up)
    assert [packed.generate(p, max_new_tokens=16, ignore_eos=True) for p in prompts] == want
    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "1")
    assert Engine(tiny_glm4, EngineConfig(device="cpu", dtype="bfloat16")).cpu_graph is None
    f32 = Engine(tiny_glm4, EngineConfig(device="cpu", dtype="float32", cpu_graph="off"))
    assert isinstance(f32.model.lm_head, torch.Tensor)  # bf16 only
