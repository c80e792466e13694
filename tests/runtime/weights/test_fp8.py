"""FP8 block-scaled checkpoints (``weight_scale_inv`` per block): we quantize a tiny model's
linear weights into FP8 blocks ourselves, then check that loading it gives the logits of the same
model written with those weights dequantized (bit for bit: the same fp32 products)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.quant_eval import compare_logits, sequence_logits
from runtime.engine import Engine, EngineConfig
from runtime.errors import CheckpointError
from runtime.weights import fp8

IDS = [5 + (i * 7) % 150 for i in range(30)]


def _engine(d, **kw):
    return Engine(d, EngineConfig(device="cpu", dtype="float32", page_size=8, **kw))


@pytest.mark.parametrize("shape,block", [((48, 40), (128, 128)), ((300, 200), (128, 128))])
def test_block_quantization_roundtrip(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    w[:10] *= 100  # blocks with very different ranges
    q, s = fp8.quantize_fp8_block(w, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    deq = fp8.dequantize_fp8_block(q, s, block)
    step = fp8._expand(s, shape, block)  # e4m3: 3 mantissa bits -> <= 1/16 relative + subnormals
    assert ((deq - w).abs() <= w.abs() / 16 + step * 2**-9).all()


@pytest.mark.parametrize("fixture,block", [("tiny_dsa", (128, 128)), ("tiny_glm4", (16, 16))])
def test_fp8_checkpoint_loads_as_its_dequantized_weights(request, tmp_path, fixture, block):
    src = request.getfixturevalue(fixture)
    f8, deq = tmp_path / "fp8", tmp_path / "deq"
    fp8.write_fp8_checkpoint(src, f8, block, dequantized_dir=deq)
    tensors = load_file(str(f8 / "model.safetensors"))
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    assert tensors[name].dtype == torch.float8_e4m3fn
    assert tensors[name + "_scale_inv"].shape == tuple(-(-n // b) for n, b in zip(
        tensors[name].shape, block, strict=True))  # fmt: skip
    cfg = json.loads((f8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == list(block)
    got = sequence_logits(_engine(f8), IDS)
    want = sequence_logits(_engine(deq), IDS)
    assert torch.equal(got, want)
    # FP8 stays near the original fp32 model (measured top-1 0.67 on tiny_dsa, where a flipped
    # DSA top-6 selection past position 6 changes whole rows, 1.0 on tiny_glm4)
    assert compare_logits(sequence_logits(_engine(src), IDS), got)["top1"] >= 0.5
    # experts memory-mapped from the FP8 file, dequantized as they are fetched
    off = _engine(f8, expert_cache="2")
    assert torch.equal(sequence_logits(off, IDS), want)


def test_bad_scale_shape_is_a_clear_error(tiny_glm4, tmp_path):
    out = tmp_path / "fp8"
    fp8.write_fp8_checkpoint(tiny_glm4, out, (16, 16))
    t = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight_scale_inv"
    t[name] = t[name][:1]
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        _engine(out)


def test_fp8_without_scale_is_refused(tiny_glm4, tmp_path):
    out = tmp_path / "fp8"
    fp8.write_fp8_checkpoint(tiny_glm4, out, (16, 16))
    t = load_file(str(out / "model.safetensors"))
    del t["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(t, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no 'model.layers.0.mlp.up_proj.weight_scale_inv'"):
        _engine(out)


def test_fp8_weight_object_dequantizes_per_call():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(40, 48, generator=g), torch.randn(3, 48, generator=g)
    q, s = fp8.quantize_fp8_block(w, (16, 16))
    obj = fp8.Fp8BlockWeight(q, s, (16, 16))
    assert obj.shape == (40, 48) and obj.nbytes == 40 * 48 + s.numel() * 4
    assert torch.equal(obj(x), x @ fp8.dequantize_fp8_block(q, s, (16, 16)).t())
    assert not fp8.keep_fp8(torch.device("cpu"))
