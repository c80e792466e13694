"""Checkpoint loading: sharded index, MTP layers left unloaded, parse errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.engine import Engine, EngineConfig
from runtime.errors import CheckpointError, ConfigError
from runtime.model_config import load_config, parse_config
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.tiny import tiny_config, write_tiny


def test_sharded_checkpoint_gives_same_tokens(tmp_path, tiny_dsa):
    tensors = load_file(str(tiny_dsa / "model.safetensors"))
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tiny_dsa / "config.json").read_text())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname))
        weight_map.update({k: fname for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = EngineConfig(device="cpu", dtype="float32", page_size=8)
    prompt = list(range(3, 30))
    a = Engine(tiny_dsa, cfg).generate(prompt, max_new_tokens=10, ignore_eos=True)
    b = Engine(d, cfg).generate(prompt, max_new_tokens=10, ignore_eos=True)
    assert a == b


def test_mtp_layer_is_recognised_and_checked_when_loaded(tmp_path):
    d = write_tiny(tmp_path, "glm_moe_dsa", num_nextn_predict_layers=1)
    tensors = load_file(str(d / "model.safetensors"))
    n = load_config(d).num_layers
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4)
    tensors[f"model.layers.{n}.enorm.weight"] = torch.zeros(4)
    save_file(tensors, str(d / "model.safetensors"))
    Engine(d, EngineConfig(device="cpu", speculative=0))  # left unloaded: loads without error
    with pytest.raises(CheckpointError, match="enorm.*--speculative off"):  # auto loads it
        Engine(d, EngineConfig(device="cpu"))
    raw = json.loads((d / "config.json").read_text())
    raw["num_nextn_predict_layers"] = 0
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="beyond num_hidden_layers"):
        Engine(d, EngineConfig(device="cpu"))


def test_lazy_access_does_not_read_everything(tiny_glm4):
    ck = Checkpoint(tiny_glm4)
    assert ck.shape("model.embed_tokens.weight") == (203, 40)
    with pytest.raises(CheckpointError, match="missing"):
        ck.get("model.nope")


def test_config_errors():
    with pytest.raises(ConfigError, match="supported"):
        parse_config({"model_type": "qwen3"})
    raw = tiny_config("glm_moe_dsa", n_group=3)
    with pytest.raises(ConfigError, match="n_group"):
        parse_config(raw)
    raw = tiny_config("glm_moe_dsa")
    del raw["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        parse_config(raw)


def test_legacy_rope_fields():
    raw = tiny_config("glm4_moe")
    del raw["rope_parameters"]
    raw["rope_theta"] = 500.0
    cfg = parse_config(raw)
    assert cfg.rope.theta == 500.0 and cfg.rotary_dim == 6


def test_get_reads_every_dtype_exactly_as_safetensors(tmp_path):
    """Tensors are read with plain file reads (no memory map): the same values, dtypes and
    shapes as safetensors' own loader, zero-size tensors included."""
    g = torch.Generator().manual_seed(0)
    want = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 3, generator=g).to(torch.float16),
        "i8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8, generator=g),
        "i64": torch.arange(6).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 4),
    }
    save_file(want, str(tmp_path / "model.safetensors"))
    ref = load_file(str(tmp_path / "model.safetensors"))
    ck = Checkpoint(tmp_path)
    for name, t in ref.items():
        got = ck.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), name
    assert ck.get("f32", torch.float64).dtype == torch.float64


def test_loading_maps_no_checkpoint_file(tiny_glm4):
    """The checkpoint's pages never count in this process's resident memory: after an engine
    loaded every weight, no safetensors file of the checkpoint is memory-mapped."""
    e = Engine(tiny_glm4, EngineConfig(page_size=4, cpu_graph="off"))
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    assert str(tiny_glm4) not in maps and ".safetensors" not in maps
    assert e.model is not None


def test_tensor_bytes_that_disagree_with_the_shape_are_an_error(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    raw = bytearray((tmp_path / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["w"]["shape"] = [4, 5]  # claims more values than its bytes hold
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    body = body.ljust(n)
    (tmp_path / "model.safetensors").write_bytes(bytes(raw[:8]) + body + bytes(raw[8 + n :]))
    with pytest.raises(CheckpointError, match="its shape needs"):
        Checkpoint(tmp_path).get("w")
