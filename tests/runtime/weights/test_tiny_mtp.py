"""Random tiny checkpoints with MTP layers (runtime/weights/tiny.py, `kvscope make-tiny --mtp`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from runtime.engine import Engine, EngineConfig
from runtime.weights.tiny import write_tiny

ARCHS = ["glm_moe_dsa", "glm4_moe"]


def _mtp_names(tensors: dict, layer: int) -> set[str]:
    prefix = f"model.layers.{layer}."
    return {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)}


@pytest.mark.parametrize("arch", ARCHS)
def test_mtp_layer_layout_and_main_weights_unchanged(tmp_path, arch):
    plain = load_file(str(write_tiny(tmp_path / "plain", arch) / "model.safetensors"))
    d = write_tiny(tmp_path / "mtp", arch, mtp=2)
    raw = json.loads((d / "config.json").read_text())
    n = raw["num_hidden_layers"]
    assert raw["num_nextn_predict_layers"] == 2
    tensors = load_file(str(d / "model.safetensors"))
    for k, v in plain.items():  # the MTP layers are drawn after every main tensor
        assert torch.equal(tensors[k], v), k
    assert {k.split(".")[2] for k in set(tensors) - set(plain)} == {str(n), str(n + 1)}
    names = _mtp_names(tensors, n)
    dim = raw["hidden_size"]
    assert tensors[f"model.layers.{n}.eh_proj.weight"].shape == (dim, 2 * dim)
    for k in ["enorm.weight", "hnorm.weight", "shared_head.norm.weight", "mlp.gate.weight"]:
        assert k in names, k
    assert "mlp.gate.e_score_correction_bias" in names
    assert "mlp.shared_experts.down_proj.weight" in names
    assert all(f"mlp.experts.{e}.up_proj.weight" in names for e in range(raw["n_routed_experts"]))
    assert not {"shared_head.head.weight", "embed_tokens.weight"} & names  # shared with main
    # Attention exactly as a main layer's (layer 1 is "shared" on DSA: compare without indexer)
    main_attn = {k for k in _mtp_names(tensors, 1) if k.startswith("self_attn.")}
    attn = {k for k in names if k.startswith("self_attn.")}
    assert {k for k in attn if ".indexer." not in k} == main_attn
    if arch == "glm_moe_dsa":
        full = {k for k in _mtp_names(tensors, 0) if ".indexer." in k}
        assert {k for k in attn if ".indexer." in k} == full and full  # a FULL indexer
    assert _mtp_names(tensors, n + 1) == names


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_and_kvscope_ignore_the_mtp_layer(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    cls = {"glm_moe_dsa": "GlmMoeDsaForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}[arch]
    cls = getattr(transformers, cls)
    a = write_tiny(tmp_path / "plain", arch)
    b = write_tiny(tmp_path / "mtp", arch, mtp=1)
    n = json.loads((b / "config.json").read_text())["num_hidden_layers"]
    hf, info = cls.from_pretrained(b, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and {k.split(".")[2] for k in info["unexpected_keys"]} == {
        str(n)
    }
    x = torch.randint(2, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, cls.from_pretrained(a, dtype=torch.float32)(x).logits)
    cfg = EngineConfig(device="cpu", dtype="float32", page_size=8)
    prompt = x[0].tolist()
    want = Engine(a, cfg).generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert Engine(b, cfg).generate(prompt, max_new_tokens=8, ignore_eos=True) == want


def test_fixtures_have_one_mtp_layer(tiny_dsa_mtp, tiny_glm4_mtp):
    for d in (tiny_dsa_mtp, tiny_glm4_mtp):
        assert json.loads((d / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_make_tiny_mtp_flag(tmp_path, capsys):
    from app.cli import run

    out = tmp_path / "ck"
    argv = ["make-tiny", "--arch", "glm4_moe", "--out", str(out)]
    assert run([*argv, "--mtp", "1"]) == 0
    assert "1 MTP layer" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert "model.layers.3.eh_proj.weight" in load_file(str(out / "model.safetensors"))
    assert run([*argv, "--mtp", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mtp" in err and "Traceback" not in err


def test_mtp_count_is_checked(tmp_path):
    with pytest.raises(ValueError, match="mtp must be an integer >= 0"):
        write_tiny(tmp_path, "glm4_moe", mtp=-1)
