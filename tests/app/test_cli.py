"""CLI contract: batch JSONL records, and one clear stderr line + exit 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.cli import main
from runtime.weights.tiny import write_tiny


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def _one_clear_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _batch(tmp_path, model, lines: list[str], *extra) -> tuple[int, list[dict]]:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    code = main(["batch", "--model", str(model), "--input", str(inp), "--output", str(out)])
    code = code if not extra else code
    return code, [json.loads(x) for x in out.read_text().splitlines()]


def test_batch_every_line_gets_a_record(tmp_path, tiny_dsa):
    lines = [
        json.dumps({"id": "ok", "prompt_ids": [3, 4, 5, 6], "max_new_tokens": 4}),
        "{not json",
        json.dumps({"id": "text", "prompt": "hello"}),  # tiny model has no tokenizer
        json.dumps({"id": "long", "prompt_ids": [3] * 700}),  # longer than the context (512)
        json.dumps({"id": "bad-param", "prompt_ids": [3], "top_p": 0}),
        json.dumps({"id": "unknown", "prompt_ids": [3], "colour": "red"}),
        json.dumps({"id": "ok2", "prompt_ids": [7, 8], "max_new_tokens": 3, "stop": ["zz"]}),
    ]
    code, recs = _batch(tmp_path, tiny_dsa, lines)
    assert code == 0
    by_id = {r["id"]: r for r in recs}
    assert len(recs) == 7 and set(by_id) == {"ok", "line-2", "text", "long", "bad-param"} | {
        "unknown",
        "ok2",
    }
    ok = by_id["ok"]
    assert len(ok["token_ids"]) == 4 and ok["finish_reason"] == "length"
    assert ok["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 4,
        "cached_tokens": {"L1": 0, "L2": 0, "L3": 0},
    }
    assert ok["integrity"]["verdict"] == "ok"
    assert "malformed JSON" in by_id["line-2"]["error"] and "in.jsonl:2" in by_id["line-2"]["error"]
    assert "prompt_ids" in by_id["text"]["error"]
    assert "context" in by_id["long"]["error"]
    assert "top_p" in by_id["bad-param"]["error"]
    assert "colour" in by_id["unknown"]["error"]


@pytest.fixture
def broken(tmp_path):
    def make(kind: str):
        d = write_tiny(tmp_path / kind, "glm4_moe")
        st = d / "model.safetensors"
        cfg = json.loads((d / "config.json").read_text())
        if kind == "missing":
            st.unlink()
        elif kind == "truncated":
            st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
        elif kind == "shape":
            cfg["intermediate_size"] += 8
        elif kind == "model_type":
            cfg["model_type"] = "llama"
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    return make


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("missing", "no model.safetensors"),
        ("truncated", "truncated"),
        ("shape", "config.json implies"),
        ("model_type", "glm_moe_dsa, glm4_moe"),
    ],
)
def test_bad_checkpoints_exit_2_with_one_line(tmp_path, capsys, broken, kind, needle):
    d = broken(kind)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_ids": [1, 2]}\n')
    code, err = _run(capsys, "batch", "--model", d, "--input", inp, "--output", tmp_path / "o")
    assert code == 2
    line = _one_clear_line(err)
    assert needle in line and str(d) in line


def test_usage_errors(tmp_path, capsys, tiny_dsa):
    code, err = _run(capsys, "batch", "--model", tiny_dsa, "--input", tmp_path / "nope.jsonl")
    assert code == 2 and "--output" in _one_clear_line(err)
    out = tmp_path / "o.jsonl"
    code, err = _run(
        capsys, "batch", "--model", tiny_dsa, "--input", tmp_path / "nope", "--output", out
    )
    assert code == 2 and "not found" in _one_clear_line(err)
    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    code, err = _run(
        capsys, "batch", "--model", tiny_dsa, "--input", inp, "--output", out, "--kv-mem", "lots"
    )
    assert code == 2 and "--kv-mem" in _one_clear_line(err)


def test_make_tiny_and_subprocess_has_no_traceback(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "make-tiny", "--arch", "glm_moe_dsa", "--out", out],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (out / "config.json").write_text(json.dumps(cfg))
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt_ids": [1]}\n')
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", "batch", "--model", out, "--input", inp]
        + ["--output", tmp_path / "o.jsonl"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model_type 'mixtral' is not supported" in r.stderr


def test_strict_exits_3_when_corruption_was_found(tmp_path, capsys, tiny_dsa):
    shared = [3 + (k * 7) % 150 for k in range(40)]  # 5 pages, evicted to L2 in between
    lines = []
    for i in range(12):
        ids = shared + [i] if i % 2 == 0 else [100 + (i * 31 + k) % 90 for k in range(40)]
        lines.append(json.dumps({"id": f"r{i}", "prompt_ids": ids}))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    common = ["batch", "--model", tiny_dsa, "--input", inp, "--output", out, "--quiet"]
    common += ["--page-size", "8", "--max-new-tokens", "6", "--max-running", "1"]
    common += ["--kv-mem", "50K", "--kv-host-mem", "50K"]  # 8 pages each
    code, _ = _run(capsys, *common, "--strict")
    assert code == 0  # a clean run finds nothing
    clean = [json.loads(x)["token_ids"] for x in out.read_text().splitlines()]
    code, _ = _run(capsys, *common, "--strict", "--inject", "host-bitflip:1.0")
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["token_ids"] for r in recs] == clean  # flipped copies were never served
    found = [r for r in recs if r["integrity"]["violations"]]
    assert found and code == 3
