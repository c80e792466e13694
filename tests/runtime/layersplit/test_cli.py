"""`kvscope batch --layer-split 2`: same greedy tokens as the normal engine's batch mode, the
prompts submitted together (bounded by --max-running), one record per input line."""

from __future__ import annotations

import json

from app.cli import main


def test_batch_layer_split_matches_engine(tiny_dsa, tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "prompt_ids": list(range(2, 14))},
        {"id": "b", "prompt_ids": [5, 6, 7], "max_new_tokens": 3},
        {"id": "c", "prompt_ids": list(range(2, 14)) + [20, 21]},  # shares a page with "a"
        {"id": "d", "prompt_ids": [5, 6], "temperature": 0.7},
        {"id": "e", "prompt_ids": [5, 6], "max_new_tokens": 0},
    ]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    common = ["batch", "--model", str(tiny_dsa), "--input", str(inp), "--quiet"]
    common += ["--max-new-tokens", "5", "--page-size", "8"]
    split = ["--layer-split", "2", "--max-running", "2", "--kv-host-mem", "1M"]
    assert main([*common, "--output", str(tmp_path / "ls.jsonl"), *split]) == 0
    assert main([*common, "--output", str(tmp_path / "ref.jsonl")]) == 0
    ls = [json.loads(x) for x in (tmp_path / "ls.jsonl").read_text().splitlines()]
    ref = {r["id"]: r for r in map(json.loads, (tmp_path / "ref.jsonl").read_text().splitlines())}
    assert [r["id"] for r in ls] == ["a", "b", "c", "d", "e", "line-6"]
    for r in ls[:3]:
        assert r["token_ids"] == ref[r["id"]]["token_ids"]
        assert r["finish_reason"] == ref[r["id"]]["finish_reason"]
        s = r["layer_split"]
        assert s["ranks"] == 2 and s["layer_owners"] and len(s["telemetry"]) == 2
        for t in s["telemetry"]:
            assert set(t["kv_bytes"]) == {"L1", "L2", "L3"} and t["kv_bytes"]["L2"] > 0
            assert t["owned_layers"] and t["max_batch"] == 2
            assert {"bcast_bytes_sent", "bcast_time_s", "pages_drained", "pages_acked"} <= set(t)
    # "c" reuses the page it shares with "a" on both ranks (a was prefilled first)
    assert ls[2]["usage"]["cached_tokens"] == {"L1": 8, "L2": 0, "L3": 0}
    assert ls[2]["layer_split"]["cached_tokens_by_rank"] == [{"L1": 8, "L2": 0, "L3": 0}] * 2
    assert ls[0]["usage"]["cached_tokens"] == {"L1": 0, "L2": 0, "L3": 0}
    assert "greedy only" in ls[3]["error"] and "max_new_tokens" in ls[4]["error"]
    assert "malformed JSON" in ls[5]["error"]
    assert (
        main(
            [*common, "--output", str(tmp_path / "x"), "--layer-split", "2", "--temperature", "0.5"]
        )
        == 2
    )
