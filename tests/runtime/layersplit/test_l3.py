"""LayerSplit L3: a second run with the same split serves prefixes from each rank's disk store;
damaged, truncated and foreign (another split) files are misses, recomputed, never served."""

from __future__ import annotations

import json
import shutil
import struct

import torch

from runtime.kv.radix import chain_hash
from runtime.layersplit import run_layer_split

PAGE, NEW = 8, 5
BASE = list(range(2, 21))
A = BASE + [30, 31, 32]
B = BASE + [40, 41]
PROMPTS = [A, B]


def _header(path) -> dict:
    data = path.read_bytes()
    _, hlen, _ = struct.unpack_from("<8sII", data)
    return json.loads(data[16 : 16 + hlen])


def _same(res, ref_res):
    assert res.tokens == ref_res.tokens
    for a, b in zip(res.logits, ref_res.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_l3_reuse_damage_and_foreign_split(greedy_reference, dsa5, tmp_path):
    disk = tmp_path / "kv"
    kw = dict(page_size=PAGE, host_bytes=1 << 20, disk_dir=disk)
    first = run_layer_split(dsa5, 2, PROMPTS, NEW, **kw)
    for prompt, toks, logits in zip(PROMPTS, first.tokens, first.logits, strict=True):
        ref_toks, ref_logits = greedy_reference(dsa5, prompt, NEW, PAGE)
        assert toks == ref_toks and (logits - ref_logits).abs().max().item() < 1e-5
    assert first.cached[1]["tokens"] == 16  # B reused A's pages in the same run (L1)
    dirs = [disk / "layersplit-2" / f"rank{r}" for r in range(2)]
    for r, owned in enumerate(first.layer_owners):  # each rank's files name its own layers
        files = sorted(dirs[r].glob("*.kvp"))
        assert files and first.telemetry[r].kv_pages["L3"] == len(files)
        assert all(_header(f)["layers"] == [owned[0], owned[-1] + 1] for f in files)

    # a second run (new ranks, same split): A's prefix comes from L3 on every rank
    second = run_layer_split(dsa5, 2, PROMPTS, NEW, **kw)
    _same(second, first)
    assert second.cached[0]["tokens"] == 16
    assert all(r == {"L1": 0, "L2": 0, "L3": 16} for r in second.cached[0]["by_rank"])
    assert second.cached[0]["by_tier"]["L3"] == 16
    assert all(t.cached_pages["L3"] == 2 and t.disk_rejected == 0 for t in second.telemetry)

    # damage: a flipped payload byte (rank 1, A's page 0), a truncated file (rank 0, page 1)
    k0 = chain_hash(0, A[:PAGE])
    k1 = chain_hash(k0, A[PAGE : 2 * PAGE])
    bad = dirs[1] / f"{k0:016x}.kvp"
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x10
    bad.write_bytes(bytes(data))
    cut = dirs[0] / f"{k1:016x}.kvp"
    cut.write_bytes(cut.read_bytes()[:-7])
    third = run_layer_split(dsa5, 2, PROMPTS, NEW, **kw)
    _same(third, first)
    # rank 0 could still serve page 0, rank 1 nothing: the agreed prefix is empty, A is
    # recomputed everywhere (and B reuses the recomputed pages from L1)
    assert third.cached[0]["tokens"] == 0
    assert all(r == {"L1": 0, "L2": 0, "L3": 0} for r in third.cached[0]["by_rank"])
    assert [t.disk_rejected for t in third.telemetry] == [1, 1]
    assert third.cached[1]["tokens"] == 16

    # another split: files of the 2-rank split planted where a 3-rank split looks (rank 2 of
    # the 3-rank split owns the same layers 3-4 as rank 1 of the 2-rank split) are misses
    owners3 = [(0, 1), (2,), (3, 4)]
    planted = {0: dirs[0], 1: dirs[0], 2: dirs[1]}
    for r3, src in planted.items():
        dst = disk / "layersplit-3" / f"rank{r3}"
        dst.mkdir(parents=True)
        for f in src.glob("*.kvp"):
            shutil.copy(f, dst / f.name)
    n_planted = [len(list((disk / "layersplit-3" / f"rank{r}").glob("*.kvp"))) for r in range(3)]
    fourth = run_layer_split(dsa5, 3, PROMPTS, NEW, **kw)
    assert [tuple(o) for o in fourth.layer_owners] == owners3
    _same(fourth, first)
    assert fourth.cached[0]["tokens"] == 0
    assert [t.disk_rejected for t in fourth.telemetry] == n_planted
