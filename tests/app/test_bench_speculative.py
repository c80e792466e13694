"""`kvscope bench`'s speculative decoding rows on a tiny checkpoint with an MTP layer: decode with
and without drafts side by side, the accept lengths computed from the runs' own stats, greedy
tokens identical across values (lossless), and --spec-compare's one-line errors. No speed is
asserted (speed goals live in the benchmarks)."""

from __future__ import annotations

import json
import statistics

import pytest

from app.bench_spec import spec_values
from app.cli import main
from runtime.errors import KvscopeError

SMALL = ["--prompt-len", "9", "--decode-tokens", "6", "--repeats", "2", "--threads", "1"]
SMALL += ["--page-size", "4", "--peers", "none", "--no-cached", "--cpu-graph", "off"]


def test_spec_values():
    assert spec_values("default", True) == [0, 1] and spec_values("default", False) == []
    assert spec_values("default", True, "cuda") == [0, 2]  # auto: the engine's device default
    assert spec_values("off,1,3", True) == [0, 1, 3] and spec_values("none", True) == []
    assert spec_values("auto, off", True) == [1, 0]
    for bad in ("off", "off,0", "off,x", "off,-2"):
        with pytest.raises(KvscopeError, match="--spec-compare"):
            spec_values(bad, True)
    with pytest.raises(KvscopeError, match="no MTP layers"):
        spec_values("off,2", False)


def test_bench_speculation_rows(tmp_path, tiny_glm4_mtp, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tiny_glm4_mtp), "--device", "cpu", "--dtype", "float32"]
    assert main(argv + SMALL + ["--spec-compare", "off,1,3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["settings"]["kvscope_speculative"] == 1  # the table's contender: auto (1 on the CPU)
    spec = res["speculation"]
    assert spec["values"] == [0, 1, 3] and set(spec["shapes"]) == {"b1", "b8"}
    for shape, by in spec["shapes"].items():
        assert list(by) == ["off", "1 draft", "3 drafts"]
        off = by["off"]
        assert off["accept_length"] is None and off["speedup_vs_off"] is None
        assert all(r["steps"] == 0 for r in off["runs"])
        for name in ("1 draft", "3 drafts"):
            row = by[name]
            k = row["draft_tokens"]
            assert len(row["runs"]) == 2 and len(row["decode_tok_s"]["samples"]) == 2
            steps = sum(r["steps"] for r in row["runs"])
            accepted = sum(r["accepted"] for r in row["runs"])
            drafted = sum(r["drafted"] for r in row["runs"])
            assert steps > 0 and steps <= drafted <= k * steps
            assert row["accept_length"] == pytest.approx((accepted + steps) / steps)
            assert row["accept_rate"] == pytest.approx(accepted / drafted)
            med = statistics.median(row["decode_tok_s"]["samples"])
            want = med / statistics.median(off["decode_tok_s"]["samples"])
            assert row["speedup_vs_off"] == pytest.approx(want)
            # lossless: greedy tokens with drafts are those without, prompt by prompt
            batch = int(shape[1:])
            assert row["greedy_tokens"] == 2 * batch * 6
            assert row["greedy_matching"] == row["greedy_tokens"]
    assert "speculative decoding (MTP drafts" in text
    assert "b1: off " in text and "3 drafts" in text and "accept " in text
    assert "greedy tokens equal to off's: 1 draft 12/12 (b1)" in text


def test_bench_without_mtp_layers(tmp_path, tiny_glm4, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tiny_glm4), "--device", "cpu", "--dtype", "float32"]
    assert main(argv + SMALL + ["--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["speculation"] is None and res["settings"]["kvscope_speculative"] == 0
    assert "no speculative decoding rows: the model has no MTP layers" in res["notes"]
    capsys.readouterr()
    assert main(argv + SMALL + ["--spec-compare", "off,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--spec-compare" in err[0] and "no MTP layers" in err[0]
