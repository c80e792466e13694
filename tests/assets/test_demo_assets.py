"""The shipped demo model (assets/demo): layout, architecture coverage and recorded metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "assets" / "demo"
HELDOUT = ROOT / "assets" / "demo_heldout.txt"

pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="no demo model")


def _config() -> dict:
    return json.loads((DEMO / "config.json").read_text())


def _metrics() -> dict:
    return json.loads((DEMO / "metrics.json").read_text())


def _n_mtp() -> int:
    return _config().get("num_nextn_predict_layers", 0)


def test_files_and_size():
    for name in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.json",
    ]:
        assert (DEMO / name).is_file(), name
    assert (DEMO / "model.safetensors").stat().st_size <= 30 * 1024 * 1024
    assert HELDOUT.stat().st_size <= 400 * 1024


def test_config_has_every_architecture_feature():
    c = _config()
    assert c["model_type"] == "glm_moe_dsa"
    assert c["architectures"] == ["GlmMoeDsaForCausalLM"]
    assert c["dtype"] == "float32"
    # MLA
    for key in [
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
    ]:
        assert c[key] > 0, key
    # DSA: real selection, enough indexer heads, full and shared layers
    assert c["index_topk"] < 256
    assert c["index_n_heads"] >= 8
    assert set(c["indexer_types"]) == {"full", "shared"}
    assert c["indexer_types"][0] == "full"
    # MoE
    assert c["first_k_dense_replace"] == 1
    assert c["mlp_layer_types"][0] == "dense"
    assert set(c["mlp_layer_types"][1:]) == {"sparse"}
    assert c["n_routed_experts"] >= 8
    assert c["num_experts_per_tok"] >= 2
    assert c["n_shared_experts"] == 1
    assert c["n_group"] >= 2 and 1 <= c["topk_group"] < c["n_group"]
    assert c["norm_topk_prob"] is True
    assert c["routed_scaling_factor"] != 1.0
    assert c["rope_parameters"]["rope_type"] == "default"


def test_published_tensor_names():
    from safetensors import safe_open

    c = _config()
    with safe_open(str(DEMO / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
    assert dtypes == {"F32"}
    assert not [n for n in names if "gate_up_proj" in n or n.endswith("experts.down_proj")]
    sparse = [i for i, t in enumerate(c["mlp_layer_types"]) if t == "sparse"]
    for layer in sparse:
        p = f"model.layers.{layer}.mlp"
        for e in range(c["n_routed_experts"]):
            for proj in ["gate_proj", "up_proj", "down_proj"]:
                assert f"{p}.experts.{e}.{proj}.weight" in names
        assert f"{p}.gate.weight" in names
        assert f"{p}.gate.e_score_correction_bias" in names
        assert f"{p}.shared_experts.gate_proj.weight" in names
    for layer, kind in enumerate(c["indexer_types"]):
        p = f"model.layers.{layer}.self_attn.indexer"
        present = {n for n in names if n.startswith(p + ".")}
        if kind == "full":
            assert present == {
                f"{p}.wq_b.weight",
                f"{p}.wk.weight",
                f"{p}.k_norm.weight",
                f"{p}.k_norm.bias",
                f"{p}.weights_proj.weight",
            }
        else:
            assert not present
    assert "lm_head.weight" in names
    # The MTP layer (index num_hidden_layers): published nextn names, a FULL indexer, a sparse MoE;
    # embedding and head are shared with the main model, so not stored again.
    assert _n_mtp() == 1
    n = c["num_hidden_layers"]
    mtp = {
        x.removeprefix(f"model.layers.{n}.") for x in names if x.startswith(f"model.layers.{n}.")
    }
    main3 = {x.removeprefix("model.layers.3.") for x in names if x.startswith("model.layers.3.")}
    full0 = {x.removeprefix("model.layers.0.") for x in names if ".layers.0.self_attn.indexer" in x}
    extra = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"}
    assert mtp == main3 | full0 | extra
    layers = {int(x.split(".")[2]) for x in names if x.startswith("model.layers.")}
    assert layers == set(range(n + 1))


def test_tokenizer_and_chat_template():
    import jinja2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    cfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.token_to_id(cfg["eos_token"]) == 0
    assert [tok.token_to_id(t) for t in ["<|user|>", "<|assistant|>", "<|system|>"]] == [1, 2, 3]
    text = "Return the value of the named attribute."
    assert tok.decode(tok.encode(text).ids) == text
    prompt = jinja2.Template(cfg["chat_template"]).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
    )
    assert prompt == "<|system|>\nBe brief.<|user|>\nHi<|assistant|>\n"
    ids = tok.encode(prompt).ids
    assert ids[0] == 3 and ids[-2] == 2  # <|system|> ... <|assistant|> "\n"
    gen = json.loads((DEMO / "generation_config.json").read_text())
    assert 0 in gen["eos_token_id"]


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, info = transformers.GlmMoeDsaForCausalLM.from_pretrained(
        DEMO, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    return model, info


def test_loads_with_no_missing_or_unexpected_keys(hf_model):
    """transformers has no MTP layer: the only keys it does not use are the MTP layer's."""
    _, info = hf_model
    c = _config()
    assert not info["missing_keys"]
    mtp_layers = set(range(c["num_hidden_layers"], c["num_hidden_layers"] + _n_mtp()))
    assert {int(k.split(".")[2]) for k in info["unexpected_keys"]} == mtp_layers
    assert not info["mismatched_keys"]


def test_heldout_loss_matches_metrics_and_every_expert_is_used(hf_model):
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer

    model, _ = hf_model
    m = _metrics()
    ids = Tokenizer.from_file(str(DEMO / "tokenizer.json")).encode(HELDOUT.read_text()).ids
    assert len(ids) == m["heldout_tokens"]
    window, n = m["window"], m["num_windows"]
    assert n == len(ids) // window
    data = torch.tensor(ids[: n * window]).view(n, window)
    counts = {}

    def hook(module, args, output):
        counts.setdefault(id(module), []).append(output[2].flatten())

    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    handles = [r.register_forward_hook(hook) for r in routers]
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, n, 8):
                x = data[i : i + 8]
                logits = model(input_ids=x, use_cache=False).logits.float()
                total += F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    x[:, 1:].reshape(-1),
                    reduction="sum",
                ).item()
                count += x[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
    val = total / count
    assert val == pytest.approx(m["val_loss"], abs=2e-4)
    assert math.exp(val) == pytest.approx(m["ppl"], rel=1e-3)
    for r in routers:
        load = torch.bincount(torch.cat(counts[id(r)]), minlength=r.num_experts)
        assert (load > 0).all(), load.tolist()


def test_dsa_selection_is_real(hf_model):
    """At 256 tokens each query keeps index_topk keys, so later queries drop most keys."""
    model, _ = hf_model
    c = _config()
    assert c["index_topk"] * 4 <= _metrics()["window"]
    assert model.model.layers[0].self_attn.indexer.index_topk == c["index_topk"]


def test_greedy_samples_are_english():
    m = _metrics()
    assert len(m["samples"]) >= 3
    for s in m["samples"]:
        words = [w.strip(".,;:()\"'") for w in s["continuation"].split()]
        words = [w for w in words if w]
        assert len(words) >= 2, s  # greedy output may end early at <|endoftext|>
        alpha = sum(w.isalpha() for w in words) / len(words)
        assert alpha >= 0.7, s


def test_mtp_metrics_recomputed_by_the_reference():
    """metrics.json's MTP figures, recomputed with tests/mtp_reference.py (transformers' own
    decoder layer, eager attention) on every held-out window."""
    pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer

    from tests.mtp_reference import MtpReference

    m = _metrics()
    rec = m["mtp"]
    ref = MtpReference(DEMO)
    ids = Tokenizer.from_file(str(DEMO / "tokenizer.json")).encode(HELDOUT.read_text()).ids
    window = m["window"]
    agree_main = agree_true = count = 0
    for i in range(m["num_windows"]):
        w = ids[i * window : (i + 1) * window]
        h = ref.main_hidden(w)  # post-final-norm [T, D]
        logits, _ = ref.forward(w, g=torch.cat([torch.zeros_like(h[:1]), h[:-1]]))
        draft = logits[1:-1].argmax(-1)  # q = 1 .. window-2, predicting t_{q+1}
        greedy = (h @ ref.main.lm_head.weight.T)[1:-1].argmax(-1)
        target = torch.tensor(w[2:])
        agree_main += (draft == greedy).sum().item()
        agree_true += (draft == target).sum().item()
        count += target.numel()
    assert count == rec["positions"]
    # eager vs sdpa attention may flip a near-tied argmax now and then: 0.1 % of positions
    assert agree_main / count == pytest.approx(rec["top1_agree_main_greedy"], abs=1e-3)
    assert agree_true / count == pytest.approx(rec["top1_agree_true_next"], abs=1e-3)
    assert rec["accept_length_greedy_1"] == pytest.approx(
        1 + rec["top1_agree_main_greedy"], abs=1e-4
    )
    assert rec["top1_agree_true_next"] > 0.1  # learned: the commonest token is 4.2 % of the text
