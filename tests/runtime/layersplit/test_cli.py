"""`kvscope batch --layer-split 2`: same greedy tokens as the normal engine's batch mode."""

from __future__ import annotations

import json

from app.cli import main


def test_batch_layer_split_matches_engine(tiny_dsa, tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [
        {"id": "a", "prompt_ids": list(range(2, 14))},
        {"id": "b", "prompt_ids": [5, 6, 7], "max_new_tokens": 3},
    ]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    common = ["batch", "--model", str(tiny_dsa), "--input", str(inp), "--quiet"]
    common += ["--max-new-tokens", "5", "--page-size", "8"]
    assert main([*common, "--output", str(tmp_path / "ls.jsonl"), "--layer-split", "2"]) == 0
    assert main([*common, "--output", str(tmp_path / "ref.jsonl")]) == 0
    ls = [json.loads(x) for x in (tmp_path / "ls.jsonl").read_text().splitlines()]
    ref = {r["id"]: r for r in map(json.loads, (tmp_path / "ref.jsonl").read_text().splitlines())}
    assert [r["id"] for r in ls] == ["a", "b", "line-3"]
    for r in ls[:2]:
        assert r["token_ids"] == ref[r["id"]]["token_ids"]
        assert r["layer_split"]["ranks"] == 2 and r["layer_split"]["layer_owners"]
    assert "malformed JSON" in ls[2]["error"]
    assert (
        main(
            [*common, "--output", str(tmp_path / "x"), "--layer-split", "2", "--temperature", "0.5"]
        )
        == 2
    )
