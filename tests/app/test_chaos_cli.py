"""`kvscope chaos` end to end on a tiny model: the report's shape and its protections-on claims
(every abort-reuse injection prevented by safe reclaim, every byte-changing host bit flip
detected, no corrupt token against the clean run), the --clean-only mode, and a bad --inject
as one clear line with exit 2."""

from __future__ import annotations

import json

from app.cli import main


def test_chaos_report_protections_on(tmp_path, tiny_dsa, capsys):
    out = tmp_path / "chaos.json"
    argv = ["chaos", "--model", tiny_dsa, "--requests", 24, "--max-new-tokens", 10, "--json", out]
    argv += ["--inject", "abort-reuse:1.0", "--inject", "host-bitflip:1.0", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "overhead of the default checks on decode" in printed
    rep = json.loads(out.read_text())
    assert set(rep["kinds"]) == {"abort-reuse", "host-bitflip"}
    assert rep["clean"]["false_positives"] == 0 and rep["clean"]["tokens"] == 240
    assert rep["kinds"]["abort-reuse"]["prevented"] == rep["kinds"]["abort-reuse"]["injected"] > 0
    for kind, row in rep["kinds"].items():
        assert row["injected"] > 0, (kind, row)
        assert row["corrupt_tokens_emitted"] == 0, (kind, row)
        assert row["detected"] == row["changed"], (kind, row)


def test_chaos_clean_only(tmp_path, tiny_dsa, capsys):
    argv = ["chaos", "--model", tiny_dsa, "--requests", 4, "--max-new-tokens", 4, "--clean-only"]
    assert main([str(a) for a in argv]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["clean_tokens"] == 16 and rep["false_positives"] == 0


def test_chaos_bad_inject_is_one_line(tiny_dsa, capsys):
    code = main(["chaos", "--model", str(tiny_dsa), "--inject", "cosmic-ray"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and "cosmic-ray" in err
