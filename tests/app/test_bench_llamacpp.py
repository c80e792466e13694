"""llama.cpp as a bench peer, and the benchmark presets it runs on.

Fast: the preset writer at a reduced size, the GGUF type / command mapping, the converter
wrapper's pre-tokenizer fallback (on a stand-in converter tree), the tool-output parsers on
outputs captured from real llama-bench / llama-batched-bench runs (tests/app/data/), the figures'
llama.cpp columns and the missing-build error. End to end only where `make llamacpp` has built
the tools (skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app import bench_llamacpp as bl
from app.bench_figures import KV, LLAMACPP, FigureSpec, build_figure, format_table
from app.bench_floors import param_counts
from app.bench_runners import RunResult
from app.cli import main
from app.llamacpp_convert import pre_tokenizer_name
from runtime.errors import KvscopeError
from runtime.model_config import parse_config
from runtime.tokenizer import Tokenizer
from runtime.weights import bpe
from runtime.weights.presets import preset_config, write_preset

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]
SMALL = dict(
    vocab_size=700,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
)


DSA_SMALL = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8)
DSA_SMALL.update(v_head_dim=8, index_head_dim=16, num_key_value_heads=4, indexer_types=["full"] * 2)
GLM4_SMALL = dict(num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def preset_cache(tmp_path_factory):
    """The XDG cache dir the presets' tokenizer was cached in (each test gets its own
    XDG_CACHE_HOME from tests/conftest.py; cache tests point it back here)."""
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture(scope="module")
def presets(tmp_path_factory, preset_cache):
    """Reduced-size cpu-mini presets of both architectures (tokenizer cache in a temp dir)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(preset_cache))
    made = {}
    for arch, extra in (("glm_moe_dsa", DSA_SMALL), ("glm4_moe", GLM4_SMALL)):
        out = tmp_path_factory.mktemp(arch)
        raw = write_preset(out, "cpu-mini", arch, corpus_bytes=200_000, **SMALL, **extra)
        made[arch] = (out, raw)
    yield made
    mp.undo()


@pytest.fixture(scope="module")
def small_preset(presets):
    return presets["glm_moe_dsa"]


@pytest.mark.parametrize("arch", ["glm4_moe", "glm_moe_dsa"])
def test_cpu_mini_shape(arch):
    raw = preset_config("cpu-mini", arch)
    cfg = parse_config(raw)
    assert raw["architectures"] == [
        {"glm4_moe": "Glm4MoeForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM"}[arch]
    ]
    assert cfg.n_routed_experts >= 64 and cfg.num_experts_per_tok == 8
    assert cfg.vocab_size == 32000 and raw["dtype"] == "bfloat16"
    assert cfg.mlp_layer_types[0] != "sparse" and cfg.mlp_layer_types[1] == "sparse"
    counts = param_counts(cfg)
    assert counts["active_per_token"] * 2 > 200e6  # bf16 bytes read per token: hundreds of MB
    if arch == "glm_moe_dsa":
        assert raw["index_topk"] == 2048 and raw["max_position_embeddings"] >= 16384
        assert cfg.index_n_heads >= 8  # TRAPS: fewer heads tie the indexer's scores


def test_preset_writer_small(small_preset):
    out, raw = small_preset
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "GlmMoeDsaForCausalLM"
    ]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in names[:20])
        emb = f.get_tensor("model.embed_tokens.weight").float()
        w = f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").float()
    assert emb.shape == (700, 64) and torch.isfinite(emb).all()
    assert abs(w.std().item() - 64**-0.5) < 0.02  # fan-in scaled, not the tiny model's 0.15
    tok = Tokenizer(out)
    assert tok.vocab_size <= raw["vocab_size"]
    assert [tok._tok.token_to_id(t) for t in bpe.SPECIAL_TOKENS] == list(range(10))
    text = tok.apply_chat_template([{"role": "user", "content": "def f(x): return x"}])
    assert text.startswith("[gMASK]<sop><|user|>\n") and text.endswith("<|assistant|>\n")
    ids = tok.encode("import os\nprint(os.getcwd())")
    assert tok.decode(ids) == "import os\nprint(os.getcwd())"
    assert pre_tokenizer_name(out) == "gpt-2"


def test_tokenizer_cached_and_deterministic(small_preset, preset_cache, tmp_path, monkeypatch):
    out, raw = small_preset
    monkeypatch.setenv("XDG_CACHE_HOME", str(preset_cache))

    def no_training(*a, **k):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(bpe, "train", no_training)
    bpe.write_tokenizer(tmp_path, raw["vocab_size"], 512, 200_000)  # served from the cache
    assert (tmp_path / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    monkeypatch.undo()
    fresh = bpe.train([bpe._read(p) for p in bpe.corpus_files(200_000)], raw["vocab_size"])
    assert (
        json.loads(fresh.to_str())["model"]
        == json.loads((out / "tokenizer.json").read_text())["model"]
    )


def test_pre_tokenizer_name_other(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": {"type": "Metaspace"}}))
    assert pre_tokenizer_name(tmp_path) is None
    assert pre_tokenizer_name(tmp_path / "missing") is None


FAKE_BASE = """
class TextModel:
    def __init__(self, dir_model):
        self.dir_model = dir_model
    def get_vocab_base_pre(self, tokenizer):
        if tokenizer == "known":
            return "llama-bpe"
        raise NotImplementedError("BPE pre-tokenizer was not recognized")
import logging
logger = logging.getLogger("fake")
"""
FAKE_CONVERT = """
import sys
from conversion.base import TextModel
model_dir, out, tok = sys.argv[1], sys.argv[2], sys.argv[3]
open(out, "w").write(TextModel(model_dir).get_vocab_base_pre(tok))
"""


@pytest.mark.parametrize(
    "tok_json, tok, expect",
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "new", "gpt-2"),
        ({"type": "ByteLevel", "add_prefix_space": False}, "known", "llama-bpe"),
        ({"type": "Metaspace"}, "new", None),  # not ours: the converter's own error stands
    ],
)
def test_convert_wrapper_fallback(tmp_path, tok_json, tok, expect):
    """The wrapper patches only this process's converter, only for unknown hashes, only for a
    GPT-2-regex ByteLevel tokenizer; the tree's files stay untouched."""
    src, model = tmp_path / "llama.cpp", tmp_path / "model"
    (src / "conversion").mkdir(parents=True)
    model.mkdir()
    (src / "conversion" / "__init__.py").write_text("")
    (src / "conversion" / "base.py").write_text(textwrap.dedent(FAKE_BASE))
    (src / "convert_hf_to_gguf.py").write_text(textwrap.dedent(FAKE_CONVERT))
    (model / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": tok_json}))
    before = (src / "conversion" / "base.py").read_text()
    out = tmp_path / "pre.txt"
    cmd = [sys.executable, "-m", "app.llamacpp_convert", str(src), str(model), str(out), tok]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if expect is None:
        assert res.returncode != 0 and "pre-tokenizer was not recognized" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert out.read_text() == expect
    assert (src / "conversion" / "base.py").read_text() == before


def test_gguf_type_mapping():
    assert bl.gguf_type("none", torch.float32) == "f32"
    assert bl.gguf_type("none", torch.bfloat16) == "bf16"
    assert bl.gguf_type("int8", torch.float32) == "q8_0"
    assert bl.gguf_type("int4", torch.bfloat16) == "q4_0"
    with pytest.raises(KvscopeError, match="nf4"):
        bl.gguf_type("nf4", torch.float32)


def test_convert_commands(tmp_path):
    lc = bl.LlamaCpp(tmp_path / "bin", tmp_path / "src")
    m, out = tmp_path / "m", tmp_path / "o.gguf"
    for t in ("f32", "bf16", "q8_0"):
        (cmd,) = bl.convert_commands(lc, "py", m, t, out)
        assert cmd[:5] == ["py", "-m", "app.llamacpp_convert", str(lc.src), str(m)]
        assert cmd[5:] == ["--outtype", t, "--outfile", str(out)]
    (q,) = bl.convert_commands(lc, "py", m, "q4_0", out, bf16=tmp_path / "b.gguf")
    assert q == [str(lc.bin / "llama-quantize"), str(tmp_path / "b.gguf"), str(out), "Q4_0"]
    with pytest.raises(KvscopeError):
        bl.convert_commands(lc, "py", m, "q4_0", out)  # needs the bf16 file


def test_fingerprint_changes_with_weights(tiny_glm4, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_glm4, copy)
    a = bl.fingerprint(copy)
    assert a == bl.fingerprint(copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert bl.fingerprint(copy) != a


def test_bench_commands_threads_and_shapes(tmp_path):
    r = bl.LlamaCppRunner(bl.LlamaCpp(tmp_path, tmp_path), tmp_path / "m.gguf", 1, "bf16")
    pp, tg = r.bench_commands(1, 512, 64)
    assert pp[pp.index("-p") + 1] == "512" and pp[pp.index("-n") + 1] == "0"
    assert tg[tg.index("-n") + 1] == "63" and tg[tg.index("-d") + 1] == "512"
    (bb,) = r.bench_commands(8, 128, 64)
    assert bb[bb.index("-npl") + 1] == "8" and bb[bb.index("-npp") + 1] == "128"
    assert bb[bb.index("-ntg") + 1] == "63" and bb[bb.index("-t") + 1] == "1"
    assert int(bb[bb.index("-c") + 1]) >= 8 * (128 + 64)


def _fixture(name: str) -> str:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path.name}: no captured llama.cpp output committed")
    return path.read_text()


def test_parse_llama_bench_captured():
    rows = bl.parse_llama_bench(_fixture("llama_bench_pp.jsonl"))
    (pp,) = rows
    assert pp["n_prompt"] > 0 and pp["n_gen"] == 0 and pp["tok_s"] > 0 and pp["n_threads"] == 1
    (tg,) = bl.parse_llama_bench(_fixture("llama_bench_tg.jsonl"))
    assert tg["n_prompt"] == 0 and tg["n_gen"] > 0 and tg["n_depth"] > 0 and tg["tok_s"] > 0
    assert tg["build"] and tg["model_size"] > 1e8


def test_parse_batched_bench_captured():
    (row,) = bl.parse_batched_bench(_fixture("llama_batched_bench.jsonl"))
    assert row["pl"] == 8 and row["pp"] > 0 and row["tg"] > 0
    assert row["speed_tg"] == pytest.approx(row["pl"] * row["tg"] / row["t_tg"], rel=1e-3)


def test_parsers_reject_empty():
    with pytest.raises(KvscopeError, match="no result"):
        bl.parse_llama_bench("main: error\n")
    with pytest.raises(KvscopeError, match="no result"):
        bl.parse_batched_bench("\n")


def test_figures_llamacpp_column():
    def rr(decode_s):
        return RunResult(1, 4, 5, 0.1, decode_s, [[1] * 5], 0.0)

    runs = {KV: {"b1": [rr(0.4), rr(0.5)]}, LLAMACPP: {"b1": [rr(0.2)]}, "eager": {"b1": [rr(1)]}}
    spec = FigureSpec("decode_b1", "decode, batch 1", "tok/s", "higher", "b1", floor=True)
    spec = FigureSpec(**{**spec.__dict__, "value": lambda r: r.decode_tok_s})
    fig = build_figure(spec, runs, {}, {"b1": 100.0}, {})
    assert fig["peer"]["variant"] == "eager"  # llama.cpp is never "transformers fastest"
    assert fig["llamacpp"]["median"] == pytest.approx(20.0)
    kv = (4 / 0.4 + 4 / 0.5) / 2
    assert fig["ratio_vs_llamacpp"] == pytest.approx(kv / 20.0)
    assert fig["llamacpp_floor_fraction"] == pytest.approx(0.2)
    mem = FigureSpec("peak_mem_cpu", "peak memory", "MB", "lower", source="memory:cpu")
    fm = build_figure(mem, runs, {KV: {"cpu": 3e9}, LLAMACPP: {"cpu": 1e9}}, {}, {})
    assert fm["ratio_vs_llamacpp"] == pytest.approx(1 / 3)
    table = format_table([fig, fm])
    assert "llama.cpp" in table.splitlines()[0] and "0.45x" in table and "0.33x" in table


def test_peers_llamacpp_not_built(tmp_path, tiny_glm4, monkeypatch, capsys):
    monkeypatch.setenv("KVSCOPE_LLAMACPP_DIR", str(tmp_path / "none"))
    args = ["bench", "--model", str(tiny_glm4), "--device", "cpu", "--peers", "llamacpp"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make llamacpp" in err


def test_peers_all_skips_llamacpp_with_a_note(tmp_path, tiny_glm4, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.setenv("KVSCOPE_LLAMACPP_DIR", str(tmp_path / "none"))
    out = tmp_path / "b.json"
    args = ["bench", "--model", str(tiny_glm4), "--device", "cpu", "--dtype", "float32"]
    args += ["--prompt-len", "8", "--decode-tokens", "3", "--repeats", "1", "--threads", "1"]
    args += ["--peers", "all", "--no-cached", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["llamacpp"] is None and any("make llamacpp" in x for x in res["notes"])
    assert "note: llama.cpp skipped" in capsys.readouterr().out


def test_end_to_end_llamacpp(tmp_path, presets, monkeypatch, capsys):
    """Only where `make llamacpp` built the tools: convert, time, compare tokens."""
    lc, why = bl.available()
    if lc is None:
        pytest.skip(why)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "b.json"
    args = [
        "bench",
        "--model",
        str(presets["glm4_moe"][0]),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    args += ["--prompt-len", "16", "--decode-tokens", "6", "--repeats", "2", "--threads", "1"]
    args += ["--peers", "llamacpp", "--no-cached", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["llamacpp"]["gguf_type"] == "f32"
    figs = {f["key"]: f for f in res["figures"]}
    for key in ("prefill_b1", "decode_b1", "decode_b8", "peak_mem_cpu"):
        assert figs[key]["llamacpp"]["median"] > 0 and figs[key]["ratio_vs_llamacpp"] > 0
    assert len(res["runs"][LLAMACPP]["b1"]) == 2
    assert figs["decode_cpu_b1"]["llamacpp"] is None  # the tools' CPU time is not per decode
    la = res["agreement"]["llamacpp"]
    assert la["tokens"] == 6 and len(la["llamacpp_tokens"]) == 6
    assert la["matching"] >= 1  # fp32 on both sides: the first greedy token at least agrees
    assert "greedy agreement, batch 1" in capsys.readouterr().out


def test_run_tool_peak_rss_is_the_childs_own():
    """150 MB in the child: its own high-water mark, not the parent's RSS folded in at exec."""
    code = "b = bytearray(150_000_000); b[::4096] = b'x' * len(b[::4096]); "
    code += "import time; time.sleep(0.3)"
    out, peak = bl.run_tool([sys.executable, "-c", code + "; print('ok')"])
    assert out.strip() == "ok"
    assert 150e6 <= peak < 150e6 + 100e6
    with pytest.raises(KvscopeError, match="exited 3"):
        bl.run_tool([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_quant_eval_peers_llamacpp_not_built(tmp_path, tiny_glm4, monkeypatch, capsys):
    monkeypatch.setenv("KVSCOPE_LLAMACPP_DIR", str(tmp_path / "none"))
    args = ["quant-eval", "--model", str(tiny_glm4), "--tokens", "8", "--window", "4"]
    assert main(args + ["--peers", "llamacpp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make llamacpp" in err


def test_quant_eval_beside_llamacpp(tmp_path, presets, monkeypatch):
    """Only where `make llamacpp` built the tools: llama.cpp's Q8_0 / Q4_0 against its own F32
    on the windows kvscope's int8 / int4 are judged on, and its F32 against kvscope's fp32."""
    lc, why = bl.available()
    if lc is None or not Path(lc.tool("kvscope-logits")).is_file():
        pytest.skip(why or "kvscope-logits not built: run `make llamacpp`")
    from app.quant_eval import quant_quality

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, SMALL["vocab_size"], (48,), generator=g).tolist()
    model = presets["glm4_moe"][0]
    res = quant_quality(model, ids, ("int8", "int4"), window=24, total=48, peers="llamacpp")
    peer = res["llamacpp"]
    same = peer["f32_vs_kvscope_fp32"]
    assert same["tokens"] == 48 and same["kl"] < 1e-3 and same["top1"] >= 0.95
    assert 0 < peer["q8_0"]["kl"] < peer["q4_0"]["kl"]  # fewer bits, further from F32
    assert 0 < res["int8"]["kl"] < res["int4"]["kl"]
