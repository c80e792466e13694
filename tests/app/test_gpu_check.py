"""`kvscope gpu-check`: the CPU rehearsal of every section (so the GPU script does not rot between
GPU runs), the JSON it leaves when a section times out, the preflight's messages, and the
developer modes moved out of the product packages (issue #16)."""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

import pytest
import torch

from app import gpu_check, gpu_preflight
from app.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]

# Every section's figures that must be present (and numeric / true) after a rehearsal.
FIGURES = {
    "kernels": ["ops", "ops_ok", "models", "models_ok"],
    "mini": ["copy_bandwidth_GBps", "kvscope", "transformers", "ratios"],
    "hicache": ["ttft_s", "speedup", "served_tokens", "integrity"],
    "integrity": ["decode_tok_s", "overhead"],
    "offload": ["kvscope", "transformers_accelerate"],
}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "rehearsal.json"
    rc = cli_main(["gpu-check", "--rehearse", "--no-install", "--json", str(out)])
    return rc, json.loads(out.read_text())


def test_rehearsal_runs_every_section_with_its_figures(rehearsal):
    rc, doc = rehearsal
    assert doc["schema"] == "kvscope-gpu-check/1" and doc["rehearsal"] and doc["complete"]
    names = [s["name"] for s in doc["sections"]]
    assert names == list(gpu_check.SECTIONS), names
    for s in doc["sections"]:
        assert s["status"] == "ok", (s["name"], s.get("error"))
        missing = [k for k in FIGURES[s["name"]] if k not in s["figures"]]
        assert not missing, (s["name"], missing)
        assert 0 < s["elapsed_s"] <= s["limit_s"]
    assert rc == 0
    fig = {s["name"]: s["figures"] for s in doc["sections"]}
    assert fig["kernels"]["ops_ok"] and fig["kernels"]["models_ok"]
    ops = {r["op"] for r in fig["kernels"]["ops"]}
    assert ops == set(gpu_check_ops()), ops
    assert {m["arch"] for m in fig["kernels"]["models"]} == {"glm_moe_dsa", "glm4_moe"}
    for who in ("kvscope", "transformers"):
        for k in ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s", "weight_bw_fraction_b1"):
            assert fig["mini"][who][k] > 0, (who, k)
    assert set(fig["hicache"]["speedup"]) == {"L2", "L3"}
    assert min(min(v) for v in fig["hicache"]["served_tokens"].values()) >= 64
    assert set(fig["integrity"]["decode_tok_s"]) == {"checks_on", "checks_off"}
    assert set(fig["offload"]["kvscope"]) == {"unquantized", "int4", "nf4", "fp8"}
    for r in fig["offload"]["kvscope"].values():
        assert r["decode_tok_s"] > 0 and 0 < r["capacity"] < 8  # 25 % of 8 experts
    assert fig["offload"]["transformers_accelerate"]["decode_tok_s"] > 0
    # every target has a value and a verdict (met or missed: CPU figures mean nothing here);
    # rates are positive, an overhead may come out negative (noise on a shared CPU)
    for name, t in doc["targets"].items():
        assert isinstance(t["met"], bool) and math.isfinite(t["ratio"]), (name, t)
        assert t["ratio"] > 0 or t["target"].startswith("<="), (name, t)


def gpu_check_ops() -> list[str]:
    from app.gpu_kernels import CHECKS

    return [k for k in CHECKS if k != "model"]


def test_a_timed_out_section_keeps_the_earlier_ones(tmp_path, capsys):
    out = tmp_path / "cut.json"
    argv = ["--rehearse", "--no-install", "--json", str(out), "--only", "hicache", "integrity"]
    # 0.2 s: the section's process is killed before it can have imported torch, whatever the
    # machine's speed (at 1.5 s a quiet machine had already saved an overhead figure)
    rc = gpu_check.main(argv + ["--limit", "integrity=0.2"])
    doc = json.loads(out.read_text())
    assert rc == 1 and doc["complete"]
    hicache, integ = doc["sections"]
    assert hicache["status"] == "ok" and "speedup" in hicache["figures"]
    assert integ["status"] == "timed_out" and integ["elapsed_s"] < 10
    assert doc["targets"]["l2_ttft_speedup"]["met"] is not None
    assert doc["targets"]["integrity_overhead"]["met"] is None
    assert doc["targets"]["decode_b1_tok_s"]["why"] == "section not run"
    assert "section integrity: timed_out" in capsys.readouterr().out


def test_preflight_names_what_is_missing_and_how_it_is_installed(capsys):
    found = gpu_preflight.check(version_of={"torch": "2.11.0+cu130", "transformers": "5.17.0"}.get)
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)

        class R:
            returncode = 0 if "bitsandbytes>=0.50" in cmd else 1
            stdout, stderr = "", "ERROR: No matching distribution found"

        return R()

    rec = gpu_preflight.preflight("/wheels", install=True, run=run, findings=found)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "bitsandbytes" in x and "missing" in x)
    assert "offload" in line and "-m pip install" in line
    assert line.endswith("--no-index --find-links /wheels 'bitsandbytes>=0.50'")
    tline = next(x for x in out.splitlines() if x.startswith("preflight: transformers"))
    assert "version 5.17.0, wanted transformers==5.23.0" in tline
    assert not any(s.startswith("torch") for s in rec["still_missing"])
    assert not any("torch " in p for p in rec["problems"])  # 2.11.0+cu130 satisfies >= 2.11
    assert "bitsandbytes>=0.50" in rec["installed"]
    assert "transformers==5.23.0" in rec["still_missing"]
    assert all(c[:4] == [c[0], "-m", "pip", "install"] for c in calls)
    rec = gpu_preflight.preflight(None, install=False, findings=found)
    assert "from the package registry" in rec["problems"][0] and not rec["installed"]


def test_preflight_mirrors_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = py["dependencies"] + py["optional-dependencies"]["test"]
    pinned = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(>=|==)\s*([0-9.]+)", r)
        if m:
            pinned[m.group(1).lower()] = (m.group(2), m.group(3))
    for need in gpu_preflight.NEEDS:
        op, version = pinned[need.dist]
        assert (op == "==") == need.exact and version == need.minimum, need


def test_version_compare():
    v = gpu_preflight._vtuple
    assert v("2.11.0+cu130") == v("2.11") < v("2.12") and v("0.50.0.dev1") == v("0.50")


def test_bad_arguments_give_one_line(capsys):
    assert gpu_check.main(["--only", "nope"]) == 2
    assert gpu_check.main(["--rehearse", "--limit", "mini=x"]) == 2
    assert gpu_check.main(["--wheels", "/no/such/dir"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("kvscope gpu-check: error:") for e in err)


def test_without_cuda_the_gpu_run_points_to_the_rehearsal(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert gpu_check.main(["--no-install", "--json", str(tmp_path / "x.json")]) == 2
    assert "--rehearse" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_dev_modes_are_cli_modes(capsys, tmp_path):
    assert cli_main(["quant-eval", "--model", str(tmp_path / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli_main(["expert-bench", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("CUDA" in err) != torch.cuda.is_available()


def test_quant_eval_mode_runs(tiny_glm4, tmp_path, capsys):
    out = tmp_path / "q.json"
    argv = ["quant-eval", "--model", str(tiny_glm4), "--methods", "int4", "--tokens", "24"]
    assert cli_main(argv + ["--window", "12", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["int4"]["tokens"] == 24 and 0 <= res["int4"]["top1"] <= 1


def test_mini_is_the_anchors_configuration():
    """The GPU run's "mini" (app/gpu_sections.MINI) parses and has the size ANCHORS.md states:
    6.43 B parameters, 650 M active per token; a typo here would cost a GPU run."""
    from app.bench_floors import param_counts
    from app.gpu_sections import MINI
    from runtime.model_config import parse_config
    from runtime.weights.tiny import tiny_config

    cfg = parse_config(tiny_config("glm_moe_dsa", **MINI))
    counts = param_counts(cfg)
    assert round(counts["total"] / 1e9, 2) == 6.43, counts["total"]
    assert round(counts["active_per_token"] / 1e6, -1) == 650, counts["active_per_token"]
    assert cfg.max_position_embeddings >= 8192 + 64  # the HiCache prefix and its tail


def test_tiny_weights_drawn_in_bf16_load(tmp_path):
    """write_tiny(dtype=bfloat16) as the GPU run writes mini (there on the device)."""
    from runtime.engine import Engine, EngineConfig
    from runtime.weights.tiny import write_tiny

    d = write_tiny(tmp_path, "glm4_moe", dtype=torch.bfloat16)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    e = Engine(d, EngineConfig(device="cpu", dtype="bfloat16", cpu_graph="off"))
    assert len(e.generate([5, 6, 7, 8], max_new_tokens=3, ignore_eos=True)) == 3


def test_developer_tools_left_the_product_packages():
    """Issue #16's part for the tools: they live in app/; kernels/ imports nothing of runtime/ or
    app/, runtime/weights/ neither the engine nor app/ (imports inside functions included)."""
    import ast

    for old in ("kernels/gpu_check.py", "runtime/models/kernel_check.py",
                "runtime/weights/expert_bench.py", "runtime/weights/quant_eval.py"):  # fmt: skip
        assert not (ROOT / old).exists(), old
    banned = {
        "kernels": ("runtime", "app", "inspector"),
        "runtime/weights": ("runtime.engine", "app"),
    }
    for folder, prefixes in banned.items():
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    bad = [p for p in prefixes if n == p or n.startswith(p + ".")]
                    assert not bad, f"{f.relative_to(ROOT)} imports {n}"
