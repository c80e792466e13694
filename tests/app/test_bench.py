"""`kvscope bench` on a tiny random model: JSON structure, figures computed from the measured
samples (not hard-coded), greedy agreement, and the floors' parameter count."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from app.bench_figures import FigureSpec, build_figure, ratio
from app.bench_floors import bytes_per_step, decode_floor_tok_s, param_counts
from app.bench_runners import RunResult
from app.cli import main
from runtime.model_config import load_config
from runtime.weights.tiny import write_tiny

pytest.importorskip("transformers")

SMALL = ["--prompt-len", "12", "--decode-tokens", "3", "--repeats", "2", "--threads", "1"]
SMALL += ["--page-size", "4"]  # two full pages of the prompt can be cached


def _bench(tmp_path, model_dir, *extra) -> dict:
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32"]
    assert main(args + SMALL + ["--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_bench_json_and_ratios(tmp_path, tiny_dsa, capsys):
    res = _bench(tmp_path, tiny_dsa)
    table = capsys.readouterr().out
    assert "decode, batch 1" in table and "TTFT, prefix cached in L3" in table
    assert "greedy agreement, batch 1, float32" in table
    assert res["command"].startswith("kvscope bench --model")
    for key in ("machine", "versions", "settings", "model", "floors", "agreement", "runs"):
        assert key in res, key
    assert res["versions"]["transformers"] and res["settings"]["threads"] == 1
    assert res["settings"]["prompt_len"] == 12 and res["settings"]["decode_tokens"] == 3
    figs = {f["key"]: f for f in res["figures"]}
    assert {"prefill_b1", "prefill_b8", "decode_b1", "decode_b8", "ttft_cold"} <= set(figs)
    assert figs["expert_hit_rate"]["na"]
    # cached-prefix rows: each timed run was served from its tier (8 of 12 prompt tokens)
    assert res["cached_ttft"]["prompt_tokens_cacheable"] == 8
    for rec in res["cached_ttft"]["runs"]:
        assert rec["cached_tokens"][rec["tier"]] > 0
    for tier in ("L1", "L2", "L3"):
        f = figs[f"ttft_{tier.lower()}"]
        kv = [r["prefill_s"] * 1e3 for r in res["runs"]["kvscope"][f"cached_{tier}"]]
        assert f["kvscope"]["samples"] == pytest.approx(kv)
        cold = statistics.median(r["prefill_s"] * 1e3 for r in res["runs"]["eager"]["b1"])
        assert f["eager"]["median"] == pytest.approx(cold)  # transformers re-pays the prefill
    # cold runs never hit the prefix cache (fresh prompts per run)
    assert not any(any(r["cached_tokens"].values()) for r in res["runs"]["kvscope"]["b1"])
    runs = res["runs"]
    for key, shape, field, scale in (
        ("decode_b1", "b1", "decode_tok_s", 1),
        ("decode_b8", "b8", "decode_tok_s", 1),
        ("prefill_b8", "b8", "prefill_tok_s", 1),
        ("ttft_cold", "b1", "prefill_s", 1e3),
        ("decode_cpu_b1", "b1", "decode_tok_cpu_s", 1),
    ):
        f = figs[key]
        kv = [r[field] * scale for r in runs["kvscope"][shape]]
        assert len(kv) == 2 and f["kvscope"]["samples"] == pytest.approx(kv)
        assert f["kvscope"]["median"] == pytest.approx(statistics.median(kv))
        assert f["kvscope"]["min"] == pytest.approx(min(kv))
        peer = f["peer"]["variant"]
        pv = [r[field] * scale for r in runs[peer][shape]]
        assert f["peer"]["samples"] == pytest.approx(pv)
        want = ratio(statistics.median(kv), statistics.median(pv), f["better"])
        assert f["ratio"] == pytest.approx(want)
        # the peer is transformers' fastest measured variant for this figure
        meds = {
            c: statistics.median(r[field] * scale for r in by[shape])
            for c, by in runs.items()
            if c != "kvscope" and shape in by
        }
        best = max(meds.values()) if f["better"] == "higher" else min(meds.values())
        assert meds[peer] == pytest.approx(best)
        if "eager" in meds:
            want = ratio(statistics.median(kv), meds["eager"], f["better"])
            assert f["ratio_vs_eager"] == pytest.approx(want)
    # every decode sample is tokens / time of the timed steps
    for r in runs["kvscope"]["b8"]:
        assert r["decode_tok_s"] == pytest.approx(8 * 2 / r["decode_s"])
    floor = res["floors"]["decode_floor_tok_s"]["b1"]
    assert figs["decode_b1"]["floor_fraction"] == pytest.approx(
        figs["decode_b1"]["kvscope"]["median"] / floor
    )
    assert figs["peak_mem_cpu"]["kvscope"]["median"] >= 0
    # float32, batch 1: kvscope's greedy tokens are transformers' (parity-tested models)
    for a in res["agreement"]["batch1"].values():
        assert a["matching"] == a["tokens"] == 3 and a["first_divergence"] is None


def test_bench_without_peers_with_expert_offload(tmp_path, tiny_glm4):
    res = _bench(tmp_path, tiny_glm4, "--peers", "none", "--expert-cache", "4", "--no-cached")
    figs = {f["key"]: f for f in res["figures"]}
    assert figs["decode_b1"]["kvscope"]["median"] > 0
    assert figs["decode_b1"]["peer"] is None and figs["decode_b1"]["ratio"] is None
    assert list(res["runs"]) == ["kvscope"]
    assert figs["ttft_l1"]["na"] == "n/a (--no-cached)"
    hit = figs["expert_hit_rate"]
    rates = [100 * r["expert_hit_rate"] for r in res["runs"]["kvscope"]["b1"]]
    assert hit["na"] is None and hit["kvscope"]["samples"] == pytest.approx(rates)
    assert 0 <= hit["kvscope"]["median"] <= 100 and res["expert_cache"]["capacity"] == 4


def test_bench_bad_input(tmp_path, tiny_dsa, capsys):
    args = ["bench", "--model", str(tiny_dsa), "--prompt-len", "600", "--peers", "none"]
    assert main(args) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_build_figure_direction():
    def rr(prefill_s, decode_s):
        return RunResult(1, 10, 5, prefill_s, decode_s, [[0] * 5])

    runs = {
        "kvscope": {"b1": [rr(0.1, 0.1), rr(0.3, 0.2)]},
        "eager": {"b1": [rr(0.2, 0.4), rr(0.2, 0.4)]},
        "grouped_mm": {"b1": [rr(0.4, 0.3), rr(0.4, 0.3)]},
    }
    rate = FigureSpec("d", "decode", "tok/s", "higher", "b1", lambda r: r.decode_tok_s, True)
    f = build_figure(rate, runs, {}, {"b1": 100.0}, {})
    kv_med = statistics.median([4 / 0.1, 4 / 0.2])
    assert f["peer"]["variant"] == "grouped_mm"  # 13.3 tok/s beats eager's 10
    assert f["ratio"] == pytest.approx(kv_med / (4 / 0.3))
    assert f["ratio_vs_eager"] == pytest.approx(kv_med / 10.0)
    assert f["floor_fraction"] == pytest.approx(kv_med / 100.0)
    ms = FigureSpec("t", "ttft", "ms", "lower", "b1", lambda r: r.prefill_s * 1e3)
    f = build_figure(ms, runs, {}, {}, {})
    assert f["peer"]["variant"] == "eager"  # 200 ms beats 400 ms
    assert f["ratio"] == pytest.approx(200.0 / 200.0)  # kvscope median (100+300)/2


def test_param_counts_match_checkpoint(tmp_path):
    for arch, over in (("glm_moe_dsa", {"attention_bias": True}), ("glm4_moe", {})):
        d = write_tiny(tmp_path / arch, arch, **over)
        cfg = load_config(d)
        n = sum(t.numel() for t in load_file(str(d / "model.safetensors")).values())
        counts = param_counts(cfg)
        assert counts["total"] == n
        e = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_moe = sum(t == "sparse" for t in cfg.mlp_layer_types)
        routed_all = n_moe * cfg.n_routed_experts * e
        routed_k = n_moe * cfg.num_experts_per_tok * e
        lookup = cfg.vocab_size * cfg.hidden_size - cfg.hidden_size  # all embedding rows but one
        assert counts["active_per_token"] == n - routed_all + routed_k - lookup
        assert bytes_per_step(cfg, 1, 4) == 4 * counts["active_per_token"]
        # batch 64 reads (almost) every expert once, so it is far cheaper per token
        assert decode_floor_tok_s(cfg, 64, 4, 1e10) > 8 * decode_floor_tok_s(cfg, 1, 4, 1e10)
    assert torch.get_num_threads() >= 1


def test_workload_kv_pool_and_quantized_floor(tiny_glm4):
    """Without --kv-mem the bench sizes kvscope's pool to its workload (as llama.cpp gets a
    context of the workload's size): enough pages for the largest batch of full sequences,
    twice over; the decode floor counts the --quant format's bytes per weight."""
    from app.bench import BATCHES, weight_bytes_per_param, workload_kv_bytes
    from runtime.engine_config import EngineConfig
    from runtime.kv.pool import KVPool
    from runtime.model_config import load_config

    cfg = load_config(tiny_glm4)
    ec = EngineConfig(page_size=4)
    got = workload_kv_bytes(cfg, ec, 128, 64)
    bpp = KVPool(cfg.num_layers, 1, 4, cfg.plane_widths(), torch.bfloat16, "meta").bytes_per_page
    need = max(BATCHES) * -(-(128 + 64) // 4) * bpp  # pages the batch's sequences fill
    assert 2 * need <= got <= 8 * need
    assert weight_bytes_per_param("none", 2) == 2.0
    assert weight_bytes_per_param("int8", 2) == 1.0
    assert 0.5 < weight_bytes_per_param("int4", 2) < 0.53
