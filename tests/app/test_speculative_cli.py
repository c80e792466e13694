"""The user-facing side of speculative decoding: --speculative / --accept-* flags (one-line
errors for bad values), and `kvscope batch` records with the speculation stats and the
acceptance detector's reasons, on a tiny checkpoint with an MTP layer."""

from __future__ import annotations

import json

import pytest

from app.cli import build_parser, main
from app.options import engine_config


def _err(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def _config(model, *flags):
    return engine_config(
        build_parser().parse_args(
            ["batch", "--model", str(model), "--input", "i", "--output", "o", *flags]
        )
    )


def test_flags_reach_the_engine_config(tiny_glm4_mtp):
    c = _config(tiny_glm4_mtp)
    assert c.speculative is None  # auto
    assert (c.integrity.accept_min_length, c.integrity.accept_max_rate) == (1.4, 0.96)
    assert (c.integrity.accept_after_tokens, c.integrity.accept_window) == (128, 64)
    assert _config(tiny_glm4_mtp, "--speculative", "off").speculative == 0
    assert _config(tiny_glm4_mtp, "--speculative", "0").speculative == 0
    assert _config(tiny_glm4_mtp, "--speculative", "AUTO").speculative is None
    c = _config(
        tiny_glm4_mtp,
        *("--speculative", "3", "--accept-min-length", "2.5", "--accept-max-rate", "0.5"),
        *("--accept-after", "7", "--accept-window", "9"),
    )
    assert c.speculative == 3
    i = c.integrity
    assert (i.accept_min_length, i.accept_max_rate, i.accept_after_tokens) == (2.5, 0.5, 7)
    assert i.accept_window == 9


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--speculative", "-1"),
        ("--speculative", "two"),
        ("--speculative", "1.5"),
        ("--accept-min-length", "x"),
        ("--accept-min-length", "-1"),
        ("--accept-max-rate", "1.5"),
        ("--accept-max-rate", "nan"),
        ("--accept-after", "-3"),
        ("--accept-after", "2.5"),
        ("--accept-window", "0"),
    ],
)
def test_bad_values_one_line_exit_2(tmp_path, capsys, tiny_glm4_mtp, flag, value):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_ids": [3, 4]}\n')
    argv = ["batch", "--model", tiny_glm4_mtp, "--input", inp, "--output", tmp_path / "o"]
    code, line = _err(capsys, *argv, flag, value)
    assert code == 2 and flag in line and repr(value) in line


def test_speculative_without_mtp_layers_and_bad_values(tmp_path, capsys, tiny_glm4):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_ids": [3, 4]}\n')
    argv = ["batch", "--model", tiny_glm4, "--input", inp, "--output", tmp_path / "o"]
    code, line = _err(capsys, *argv, "--speculative", "2")
    assert code == 2 and "no MTP layers" in line and "--speculative" in line
    code, line = _err(capsys, "chaos", "--model", tiny_glm4, "--speculative", "2")
    assert code == 2 and "no MTP layers" in line and "--speculative" in line
    code, line = _err(capsys, "chaos", "--model", tiny_glm4, "--accept-max-rate", "2")
    assert code == 2 and "--accept-max-rate" in line
    code, line = _err(capsys, *argv, "--layer-split", "2", "--speculative", "1")
    assert code == 2 and "--layer-split" in line


def _batch(tmp_path, model, n: int, *flags) -> dict:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"id": f"r{i}", "prompt_ids": [5 + i, 9, 11 + 2 * i, 4], "max_new_tokens": n}
        for i in range(3)
    ]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["batch", "--model", str(model), "--input", str(inp), "--output", str(out)]
    argv += ["--device", "cpu", "--page-size", "4", "--cpu-graph", "off", "--quiet", *flags]
    assert main(argv) == 0
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_batch_records_speculation_and_acceptance(tmp_path, tiny_glm4_mtp):
    n = 12
    off = _batch(tmp_path, tiny_glm4_mtp, n, "--speculative", "off")
    for r in off.values():
        assert r["speculation"] is None and r["integrity"]["acceptance"] is None
    on = _batch(tmp_path, tiny_glm4_mtp, n, "--speculative", "2")
    for rid, r in on.items():
        assert r["token_ids"] == off[rid]["token_ids"]  # greedy: lossless
        s = r["speculation"]
        # 2 drafts a step, fewer near the request's length limit
        assert s["steps"] >= 1 and s["steps"] <= s["drafted"] <= 2 * s["steps"]
        assert 0 <= s["accepted"] <= s["drafted"]
        assert s["accept_length"] == pytest.approx((s["accepted"] + s["steps"]) / s["steps"], 1e-3)
        assert s["accept_rate"] == pytest.approx(s["accepted"] / s["drafted"], abs=1e-3)
        # the first token comes from the prefill; the others from verify steps (and steps
        # without drafts, e.g. at the length limit)
        assert s["accepted"] + s["steps"] <= n - 1
        # default thresholds judge after 128 tokens: nothing flagged in 12
        assert r["integrity"]["acceptance"] is None and r["integrity"]["verdict"] == "ok"
    # an accept length is never above 3 with 2 drafts: a minimum of 5 flags every token judged
    after = 5
    flagged = _batch(
        tmp_path,
        tiny_glm4_mtp,
        n,
        "--speculative",
        "2",
        "--accept-min-length",
        "5",
        "--accept-after",
        str(after),
    )
    for r in flagged.values():
        a = r["integrity"]["acceptance"]
        assert a is not None and r["integrity"]["verdict"] == "suspect"
        assert a["first_token"] == after - 1  # judged once `after` tokens were generated
        assert a["flagged_tokens"] == n - (after - 1)
        assert a["first"].startswith("accept length") and "< 5" in a["first"]
        assert a["final"].startswith("accept length") and "garbled" in a["final"]
        assert r["integrity"]["violations"] == []  # suspect, not corrupt


@pytest.mark.parametrize("mode", ["chat", "inspect", "serve", "bench"])
def test_every_engine_mode_takes_and_checks_the_flags(capsys, tiny_glm4_mtp, mode):
    code, line = _err(capsys, mode, "--model", tiny_glm4_mtp, "--speculative", "lots")
    assert code == 2 and "--speculative 'lots'" in line
    code, line = _err(capsys, mode, "--model", tiny_glm4_mtp, "--accept-window", "-1")
    assert code == 2 and "--accept-window '-1'" in line
