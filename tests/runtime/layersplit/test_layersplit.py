"""LayerSplit over gloo ranks vs one rank (the model's own forward), float32.

One spawn per test, several prompts each: a long one (sparse DSA selection in prefill and
decode), a short one that crosses index_topk while decoding, and one shorter than the rank count
(a rank with no prefill tokens). 5 layers: not divisible by 2 or 3 ranks.
"""

from __future__ import annotations

from runtime.engine import Engine, EngineConfig
from runtime.layersplit import assign_layers, run_layer_split
from runtime.layersplit.cost_model import measured, predict_traffic
from runtime.model_config import load_config
from runtime.weights.tiny import write_tiny

PAGE, NEW = 8, 8
PROMPTS = [list(range(2, 25)), [7, 9, 11, 3, 5], [40, 41]]


def _check(ref, model_dir, n_ranks: int, engine_tokens: bool = False):
    res = run_layer_split(model_dir, n_ranks, PROMPTS, NEW, page_size=PAGE)
    cfg = load_config(model_dir)
    for prompt, toks, logits in zip(PROMPTS, res.tokens, res.logits, strict=True):
        ref_toks, ref_logits = ref(model_dir, prompt, NEW, PAGE)
        assert toks == ref_toks
        err = (logits - ref_logits).abs().max().item()
        assert err < 1e-5, f"max |logit diff| {err:.2e}"
    if engine_tokens:  # the normal engine agrees too
        eng = Engine(model_dir, EngineConfig(page_size=PAGE, dtype="float32", device="cpu"))
        for prompt, toks in zip(PROMPTS, res.tokens, strict=True):
            assert eng.generate(prompt, max_new_tokens=NEW, ignore_eos=True) == toks
    # ownership: every layer exactly once; telemetry reports it in snapshot() shape
    owned = sorted(li for ls in res.layer_owners for li in ls)
    assert owned == list(range(cfg.num_layers)) and len(res.layer_owners) == n_ranks
    for t in res.telemetry:
        share = len(t.owned_layers) / cfg.num_layers * res.single_rank_kv_bytes
        assert t.kv_bytes["L1"] <= share + t.bcast_buffer_peak
        assert t.kv_bytes["L1"] <= share  # the pool alone, without the transient buffers
        assert t.bcast_buffer_peak > 0 and t.bcast_bytes_recv + t.bcast_bytes_sent > 0
    # the cost model predicts the bytes moved exactly (docs/layersplit.md)
    lens = [len(p) for p in PROMPTS]
    assert measured(res) == predict_traffic(cfg, res.layer_owners, lens, NEW, 4)
    # every broadcast byte sent by an owner is received by each other rank
    sent = sum(t.bcast_bytes_sent for t in res.telemetry)
    recv = sum(t.bcast_bytes_recv for t in res.telemetry)
    assert recv == sent * (n_ranks - 1)
    assert sum(t.gather_bytes_sent for t in res.telemetry) == sum(
        t.gather_bytes_recv for t in res.telemetry
    )
    return res


def test_dsa_two_ranks(greedy_reference, dsa5):
    cfg = load_config(dsa5)
    assert cfg.index_topk < len(PROMPTS[0]) and len(PROMPTS[1]) < cfg.index_topk
    res = _check(greedy_reference, dsa5, 2, engine_tokens=True)
    assert res.layer_owners == ((0, 1, 2), (3, 4))


def test_dsa_three_ranks(greedy_reference, dsa5):
    res = _check(greedy_reference, dsa5, 3)
    assert [len(o) for o in res.layer_owners] == [2, 1, 2]
    # the prompts decode together: N - 1 hops per step, whatever the batch
    assert sum(t.hops for t in res.telemetry) == 2 * (NEW - 1)
    assert all(t.max_batch == len(PROMPTS) for t in res.telemetry)


def test_glm4_three_ranks(greedy_reference, tmp_path):
    _check(greedy_reference, write_tiny(tmp_path, "glm4_moe", num_hidden_layers=4), 3)


def test_assign_layers_balances_bytes():
    assert assign_layers([1] * 5, 3) == [(0, 1), (2,), (3, 4)]
    assert assign_layers([1] * 2, 3) == [(0,), (1,), ()]
    owners = assign_layers([704] * 78, 8)  # GLM-5: 9 or 10 layers per rank, contiguous
    assert sorted(len(o) for o in owners) == [9, 9, 10, 10, 10, 10, 10, 10]
    assert [li for o in owners for li in o] == list(range(78))
