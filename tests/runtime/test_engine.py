"""Engine behaviour: paging invariance, batching, preemption, abort/timeout, stop handling."""

from __future__ import annotations

import time

import pytest

from runtime.engine import Engine, EngineConfig
from runtime.errors import RequestError, TokenizerError
from runtime.sampling import SamplingParams

PROMPT = [5 + (i * 7) % 150 for i in range(41)]


def _engine(d, **kw):
    return Engine(d, EngineConfig(device="cpu", dtype="float32", **kw))


@pytest.mark.parametrize("fixture", ["tiny_dsa", "tiny_glm4"])
def test_page_sizes_give_the_same_tokens(request, fixture):
    d = request.getfixturevalue(fixture)
    outs = {
        ps: _engine(d, page_size=ps).generate(PROMPT, max_new_tokens=24, ignore_eos=True)
        for ps in (1, 16, 64)
    }
    assert outs[1] == outs[16] == outs[64]


@pytest.mark.parametrize("fixture", ["tiny_dsa", "tiny_glm4"])
def test_batch_of_mixed_lengths_matches_alone(request, fixture):
    d = request.getfixturevalue(fixture)
    e = _engine(d, page_size=8)
    prompts = [PROMPT[:n] for n in (3, 11, 26, 41)]
    alone = [e.generate(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
    ids = [e.submit(prompt_ids=p, max_new_tokens=16, ignore_eos=True) for p in prompts]
    e.run_until_done()
    assert [e.request(i).output_ids for i in ids] == alone
    assert e.kv.alloc.counts()["WRITING"] == e.kv.alloc.counts()["READY"] == 0


def test_sampling_is_seeded(tiny_dsa):
    e = _engine(tiny_dsa, page_size=16)
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    a = e.generate(PROMPT, **kw)
    b = e.generate(PROMPT, **kw)
    c = e.generate(PROMPT, **{**kw, "seed": 8})
    assert a == b and a != c


def test_small_pool_preempts_and_still_matches(tiny_dsa):
    ref = _engine(tiny_dsa, page_size=4)
    prompts = [PROMPT[:n] for n in (9, 14, 20)]
    alone = [ref.generate(p, max_new_tokens=14, ignore_eos=True) for p in prompts]
    probe = _engine(tiny_dsa, page_size=4)
    e = _engine(tiny_dsa, page_size=4, kv_mem=12 * probe.pool.bytes_per_page)
    assert e.pool.num_slots == 12  # far fewer than the three requests need together (~21)
    ids = [e.submit(prompt_ids=p, max_new_tokens=14, ignore_eos=True) for p in prompts]
    e.run_until_done()
    assert [e.request(i).output_ids for i in ids] == alone
    assert not e.kv.alloc.owned("0")


def test_abort_and_timeout_free_pages(tiny_glm4):
    e = _engine(tiny_glm4, page_size=4)
    a = e.submit(prompt_ids=PROMPT, max_new_tokens=50, ignore_eos=True)
    b = e.submit(prompt_ids=PROMPT[:10], max_new_tokens=50, ignore_eos=True, timeout_s=0.0)
    e.step()
    events = e.abort(a)
    assert events and events[0].finish_reason == "abort"
    time.sleep(0.01)
    e.step()
    assert e.request(b).finish_reason == "timeout"
    assert not e.has_work() and e.kv.alloc.counts()["READY"] == 0


def test_bad_requests(tiny_dsa):
    e = _engine(tiny_dsa)
    with pytest.raises(TokenizerError, match="prompt_ids"):
        e.submit("hello")
    with pytest.raises(RequestError, match="context"):
        e.submit(prompt_ids=[3] * 600)
    with pytest.raises(RequestError, match="vocabulary"):
        e.submit(prompt_ids=[10**6])
    with pytest.raises(RequestError):
        e.submit(prompt_ids=[3], params=SamplingParams(max_new_tokens=0))


def test_max_context_stops_generation(tmp_path):
    from runtime.weights.tiny import write_tiny

    d = write_tiny(tmp_path, "glm4_moe", max_position_embeddings=48)
    e = _engine(d, page_size=16)
    rid = e.submit(prompt_ids=PROMPT, max_new_tokens=100, ignore_eos=True)
    e.run_until_done()
    r = e.request(rid)
    assert r.finish_reason == "length" and len(r.tokens) == 48
