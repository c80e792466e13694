"""LayerSplit with per-rank HiCache tiers and multi-sequence decode, gloo ranks, float32.

Prompts share prefixes and decode together; tokens and logits match one rank (the model's own
forward), reused prefixes are agreed across ranks, each rank's tiers hold only its layers, and
page tables differ across ranks (slots handed out in a rank-specific order).
"""

from __future__ import annotations

from runtime.layersplit import run_layer_split
from runtime.layersplit.cost_model import measured, predict_traffic
from runtime.model_config import load_config

PAGE, NEW = 8, 6
BASE = list(range(2, 21))  # 19 tokens: two full pages shared by several prompts
A = BASE + [30, 31, 32]
B = BASE + [40, 41]
C = BASE[:10] + [50, 51, 52, 53, 54, 55, 56]  # shares one page with A
U1 = list(range(100, 123))  # unrelated, 23 tokens
U2 = list(range(130, 152))


def _check_run(ref, model_dir, res, prompts, n_ranks: int, max_batch: int):
    cfg = load_config(model_dir)
    for prompt, toks, logits in zip(prompts, res.tokens, res.logits, strict=True):
        ref_toks, ref_logits = ref(model_dir, prompt, NEW, PAGE)
        assert toks == ref_toks
        err = (logits - ref_logits).abs().max().item()
        assert err < 1e-5, f"max |logit diff| {err:.2e}"
    assert res.finish_reasons == ["length"] * len(prompts)
    # the reused prefix is the same on every rank (agreed), page aligned, and reported
    for c in res.cached:
        assert c["tokens"] % PAGE == 0
        assert all(sum(r.values()) == c["tokens"] for r in c["by_rank"])
        assert sum(c["by_tier"].values()) == c["tokens"]
    # every rank's tiers hold only its layers: bytes by tier <= its owned share of what one
    # rank would hold for the same pages (+ the transient broadcast buffers)
    for t in res.telemetry:
        share = len(t.owned_layers) / cfg.num_layers * res.single_rank_page_bytes
        for tier in ("L1", "L2", "L3"):
            assert t.kv_bytes[tier] <= share * t.kv_pages[tier] + t.bcast_buffer_peak, tier
        assert t.kv_bytes["L1"] <= len(t.owned_layers) / cfg.num_layers * res.single_rank_kv_bytes
        assert t.kv_pages["L2"] > 0 and t.kv_bytes["L2"] > 0
        assert t.max_batch == max_batch and t.pages_drained == 0
        assert t.bcast_bytes_sent + t.bcast_bytes_recv > 0 and t.bcast_time_s >= 0
    # the cost model still predicts the bytes moved exactly (batches and reused prefixes)
    pred = predict_traffic(
        cfg,
        res.layer_owners,
        [len(p) for p in prompts],
        NEW,
        4,
        cached=[c["tokens"] for c in res.cached],
        max_batch=max_batch,
    )
    assert measured(res) == pred
    # page tables differ across ranks (slot numbers are per rank), pages settled at the end
    tables = res.extra["page_tables"]
    assert any(tables[0][i] != tables[r][i] for r in range(1, n_ranks) for i in range(len(prompts)))
    for states in res.extra["page_states"]:
        assert states["FREE"] + states["CACHED"] == res.extra["num_slots"]


def test_shared_prefixes_decode_together_two_ranks(greedy_reference, dsa5):
    prompts = [A, B, C, [7, 9, 11], A + [60]]
    res = run_layer_split(
        dsa5,
        2,
        prompts,
        NEW,
        page_size=PAGE,
        max_batch=4,
        host_bytes=1 << 20,
        hooks={"scramble_slots": True},
    )
    _check_run(greedy_reference, dsa5, res, prompts, 2, max_batch=4)
    cached = [c["tokens"] for c in res.cached]
    # B and A + [60] reuse A's two pages, C its first one (admitted after A, same boundary;
    # A + [60] waits for a free batch slot and still finds A's pages)
    assert cached == [0, 16, 8, 0, 16]
    for i in (1, 2, 4):
        assert all(r["L1"] == cached[i] for r in res.cached[i]["by_rank"])
    assert all(t.cached_pages["L1"] == 5 for t in res.telemetry)
    assert [t.decode_steps for t in res.telemetry] == [2 * (NEW - 1)] * 2  # two waves of steps


def test_shared_prefixes_from_l2_three_ranks(greedy_reference, dsa5):
    """A tight L1 evicts A's pages (unrelated prompts need the room); B then gets A's prefix
    back from each rank's L2 (write-through backups), loaded and verified."""
    prompts = [A, U1, U2, B]
    res = run_layer_split(
        dsa5,
        3,
        prompts,
        NEW,
        page_size=PAGE,
        max_batch=2,
        num_slots=8,
        host_bytes=1 << 20,
        hooks={"scramble_slots": True},
    )
    _check_run(greedy_reference, dsa5, res, prompts, 3, max_batch=2)
    b = res.cached[3]
    assert b["tokens"] == 16
    assert all(r == {"L1": 0, "L2": 16, "L3": 0} for r in b["by_rank"])
    assert b["by_tier"] == {"L1": 0, "L2": 16, "L3": 0}
    assert all(t.cached_pages["L2"] == 2 and t.load_failures == 0 for t in res.telemetry)
