"""Expert offload on CPU through the engine: routed experts memory-mapped from the safetensors
file behind a small cache give exactly the tokens of fully resident weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.engine import Engine, EngineConfig

PROMPT = [5 + (i * 7) % 150 for i in range(41)]


def _engine(d, **kw):
    return Engine(d, EngineConfig(device="cpu", dtype="float32", page_size=16, **kw))


def _moe_experts(engine):
    return [layer.mlp.experts for layer in engine.model.layers if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("fixture", ["tiny_dsa", "tiny_glm4"])
def test_mmap_experts_with_a_small_cache_give_the_same_tokens(request, fixture):
    d = request.getfixturevalue(fixture)
    ref = _engine(d).generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    e = _engine(d, expert_cache="3")  # 3 slots for 8 experts x (layers - 1) MoE layers
    assert e.generate(PROMPT, max_new_tokens=16, ignore_eos=True) == ref
    plan = e.weight_plan
    assert plan.tier == "mmap" and plan.capacity == 3
    assert plan.cache.store.host_nbytes == 0  # nothing of the experts resident in RAM
    assert all(x.gate_up is None and x.bank is not None for x in _moe_experts(e))
    pool_bytes = sum(p.numel() * p.element_size() for p in plan.cache.pools.values())
    assert pool_bytes == 3 * plan.fmt.nbytes
    s = plan.stats()
    assert s.tier == "mmap" and s.total_misses > 0 and s.bytes_transferred > 0
    assert len(e.weight_plan.expert_heat()) == e.model_config.num_layers
    assert s.hits[0] == ()  # the first layer is dense


def test_mmap_views_share_the_file_mapping(tiny_glm4):
    e = _engine(tiny_glm4, expert_cache="2")
    store = e.weight_plan.cache.store
    v = store.mmap.view("model.layers.1.mlp.experts.3.down_proj.weight")
    size = (tiny_glm4 / "model.safetensors").stat().st_size
    assert v.untyped_storage().nbytes() == size  # a view on the whole mapped file, no copy
    assert v.data_ptr() != e.weight_plan.cache.pools["down"].data_ptr()


def test_batch_lfu_cpu_compute_and_host_tier_match_resident(tiny_glm4):
    prompts = [PROMPT[:n] for n in (3, 11, 26, 41)]
    ref = _engine(tiny_glm4)
    alone = [ref.generate(p, max_new_tokens=10, ignore_eos=True) for p in prompts]
    for kw in (
        dict(expert_cache="2", expert_policy="lfu", expert_cpu_compute=True),
        dict(expert_cache="25%", expert_offload="host"),
    ):
        e = _engine(tiny_glm4, **kw)
        ids = [e.submit(prompt_ids=p, max_new_tokens=10, ignore_eos=True) for p in prompts]
        e.run_until_done()
        assert [e.request(i).output_ids for i in ids] == alone, kw
    assert e.weight_plan.cache.store.tier == "host" and e.weight_plan.capacity == 4


def test_prefetch_turns_misses_into_hits(tiny_glm4):
    """Cache of 6 with top-2 routing over 2 MoE layers: without look-ahead LRU thrashes, with it
    the next layer's experts are already loaded when it runs."""
    runs = {}
    for prefetch in (False, True):
        e = _engine(tiny_glm4, expert_cache="6", expert_prefetch=prefetch)
        toks = e.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
        e.weight_plan.cache.drain()
        runs[prefetch] = (toks, e.weight_plan.stats())
    assert runs[False][0] == runs[True][0]
    off, on = runs[False][1], runs[True][1]
    assert off.prefetch_issued == 0 and on.prefetch_issued > 0
    assert on.prefetch_useful > 0 and on.prefetch_accuracy > 0.3
    assert on.hit_rate > off.hit_rate


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_fused_kernel_over_cache_slots(tiny_glm4, quant):
    """The CUDA decode path (one fused kernel over the slot pool, ids remapped to slots), run
    here with the kernels' torch references: equal to the per-expert loop over the same slots."""
    import torch

    from runtime.weights.expert_cache import slot_kernel

    e = _engine(tiny_glm4, expert_cache="5", quant=quant)
    layer = e.model.layers[1].mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, generator=g)
    weights, ids = layer.router(x)
    loop = layer.experts(x, weights, ids)
    layer.experts.fused_slots = slot_kernel(e.weight_plan.cache, on_cpu=True)
    active = sorted(set(ids.flatten().tolist()))
    got = e.weight_plan.cache.acquire(1, active, [1] * len(active))
    e.weight_plan.cache.release(got)
    slot_ids = layer.experts.bank.fused_ids(ids, got)
    assert slot_ids.tolist() == [[got.slots[i] for i in row] for row in ids.tolist()]
    torch.testing.assert_close(layer.experts(x, weights, ids), loop, atol=1e-5, rtol=1e-5)


DEMO = Path(__file__).resolve().parents[3] / "assets" / "demo"


@pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="no demo model")
def test_demo_model_offloaded_gives_the_same_text():
    """The trained demo model (real routing) with its experts memory-mapped behind a 25 % LFU
    cache: the same 48 tokens as resident weights, and look-ahead prefetch mostly right."""
    from runtime.tokenizer import Tokenizer

    ids = Tokenizer(DEMO).encode((DEMO.parent / "demo_heldout.txt").read_text())[:120]
    ref = _engine(DEMO).generate(ids, max_new_tokens=48, ignore_eos=True)
    e = _engine(DEMO, expert_cache="25%", expert_policy="lfu")
    assert e.generate(ids, max_new_tokens=48, ignore_eos=True) == ref
    e.weight_plan.cache.drain()
    s = e.weight_plan.stats()
    # 25 % of 4 MoE layers x 8 experts: the 3 main MoE layers and the MTP layer's (drafting)
    assert s.capacity == 8 and s.prefetch_useful > 0 and s.prefetch_accuracy > 0.5
