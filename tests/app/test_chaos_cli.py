"""`kvscope chaos` end to end on a tiny model: the report's shape (per kind: changed and its
share, one detection column per detector, the delay) and its protections-on claims (every
abort-reuse injection prevented by safe reclaim, every host bit flip reaches a reader and is
caught by the load's checksum, no corrupt token against the clean run), the --clean-only mode,
and a bad --inject as one clear line with exit 2."""

from __future__ import annotations

import json

from app.cli import main
from runtime.integrity.config import DETECTORS


def test_chaos_report_protections_on(tmp_path, tiny_dsa, capsys):
    out = tmp_path / "chaos.json"
    argv = ["chaos", "--model", tiny_dsa, "--requests", 24, "--max-new-tokens", 10, "--json", out]
    argv += ["--inject", "abort-reuse:1.0", "--inject", "host-bitflip:1.0", "--device", "cpu"]
    argv += ["--inject", "skip-fence:1.0"]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "overhead of the default checks on decode" in printed
    header = next(ln for ln in printed.splitlines() if ln.startswith("kind "))
    assert all(f"det:{d}" in header for d in DETECTORS) and "changed%" in header
    rep = json.loads(out.read_text())
    assert set(rep["kinds"]) == {"abort-reuse", "host-bitflip", "skip-fence"}
    assert rep["clean"]["false_positives"] == 0 and rep["clean"]["tokens"] == 240
    assert rep["kinds"]["abort-reuse"]["prevented"] == rep["kinds"]["abort-reuse"]["injected"] > 0
    assert rep["kinds"]["abort-reuse"]["changed"] == 0
    fence = rep["kinds"]["skip-fence"]  # every premature read is seen at the read
    assert fence["detected_by"]["fence"] == fence["injected"] >= fence["changed"] > 0
    flips = rep["kinds"]["host-bitflip"]
    assert flips["changed"] == flips["injected"] and flips["changed_frac"] == 1.0
    assert flips["detected_by"]["checksum"] == flips["detected"] == flips["changed"]
    for kind, row in rep["kinds"].items():
        assert row["injected"] > 0, (kind, row)
        assert list(row["detected_by"])[: len(DETECTORS)] == list(DETECTORS), (kind, row)
        assert row["corrupt_tokens_emitted"] == 0, (kind, row)


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


def test_acceptance_attributed_against_the_same_prompts_clean_run():
    """chaos credits an acceptance flag to a fault only when the same prompt's clean run did
    not raise that rule, and counts garbled requests (tokens changed) apart from intact ones."""
    from types import SimpleNamespace as NS

    from app.chaos_report import acceptance_by_prompt, acceptance_vs_clean

    def req(prompt, out, reason="length"):
        return NS(prompt_ids=prompt, output_ids=out, finish_reason=reason)

    def ev(rid, detail):
        return NS(kind="acceptance", request_id=rid, detail=detail)

    loop, garb = "accept rate 1.00 > 0.96 (looping output?)", "accept length 1.1 < 1.4 (garbled?)"
    clean = {"a": req([1], [5, 6]), "b": req([2], [5, 6]), "c": req([3], [7, 8])}
    clean_acc = acceptance_by_prompt(clean, [ev("a", loop)])
    assert clean_acc == {(1,): {"looping"}, (2,): set(), (3,): set()}
    ref = {tuple(r.prompt_ids): r.output_ids for r in clean.values()}
    faulted = {
        "x": req([1], [5, 9]),  # garbled, loops as in the clean run: not the fault's flag
        "y": req([2], [9, 9]),  # garbled, newly looping: flagged
        "z": req([3], [7, 8]),  # intact, newly flagged garbled
        "w": req([3], [1], "timeout"),  # aborted: not compared
    }
    events = [ev("x", loop), ev("y", loop), ev("z", garb), ev("w", garb)]
    got = acceptance_vs_clean(faulted, events, ref, clean_acc)
    assert got == {
        "garbled_requests": 2,
        "flagged": 1,
        "by_rule": {"garbled": 0, "looping": 1},
        "flagged_intact": 1,
    }
