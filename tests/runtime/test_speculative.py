"""Speculative decoding with the MTP layer (runtime/speculative.py, runtime/models/mtp.py).

Lossless: greedy tokens with speculation equal those without, over page boundaries mid-draft,
prefix-cached prompts, mixed-length batches and L1 pressure with L2/L3 round trips. The random
tiny MTP layers rarely guess right, so most tests also run with *oracle* drafts (the reference
run's own tokens, a share of them corrupted): every accept length from 0 to k happens.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from runtime.engine import Engine, EngineConfig
from runtime.errors import KvscopeError
from runtime.kv.pool import KVPool, token_rows
from runtime.model_config import load_config
from runtime.models import build_model
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.sampling import SamplingParams
from runtime.speculative import accept
from runtime.weights.checkpoint import Checkpoint


def _engine(path, spec, **kw) -> Engine:
    kw.setdefault("page_size", 4)
    return Engine(path, EngineConfig(speculative=spec, cpu_graph="off", **kw))


def _prompts(seed: int, n: int, vocab: int = 200, longest: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randrange(1, longest))] for _ in range(n)]


def _oracle(engine: Engine, reference: dict[str, list[int]], corrupt: float, seed: int = 1):
    """Replace the MTP's drafts by the reference continuation, a share `corrupt` of them
    wrong: the drafts the engine verifies then have every accept length."""
    rng = random.Random(seed)
    real = engine.sched.set_drafts

    def set_drafts(rid, drafts):
        seq = engine.sched.get(rid)
        if seq is None:
            return
        full, n = reference[rid], len(seq.tokens)
        good = full[n : n + len(drafts)]
        wrong = [(t + 1) % 200 if rng.random() < corrupt else t for t in good]
        real(rid, wrong + [7] * (len(drafts) - len(wrong)))

    engine.sched.set_drafts = set_drafts


def _run(engine: Engine, prompts, n=20, poison=False) -> dict[str, list[int]]:
    rids = [
        engine.submit(prompt_ids=p, max_new_tokens=n, ignore_eos=True, request_id=f"r{i}")
        for i, p in enumerate(prompts)
    ]
    while engine.has_work():
        engine.step()
        engine.sched.check_invariants()
        if poison:
            _poison_dead_rows(engine)
    out = {r: list(engine.request(r).output_ids) for r in rids}
    return out


def _poison_dead_rows(engine: Engine) -> None:
    """NaN into every row no read may reach before a later step rewrites it: main rows at
    positions >= the accepted length, MTP rows past it (rejected drafts, provisional chain)."""
    pool, ps, main = engine.pool, engine.config.page_size, engine.model.cfg.num_layers
    for seq in engine.sched.running:
        n_rows = len(seq.pages) * ps
        for layer in range(pool.num_layers):
            first = seq.computed if layer < main else seq.mtp_rows
            if first >= n_rows:
                continue
            rows = token_rows(seq.pages, first, n_rows, ps)
            for plane in pool.planes:
                flat = pool.flat(layer, plane)
                flat[rows] = float("nan")


def _reference(path, prompts, n=20, **kw):
    e = _engine(path, 0, **kw)
    try:
        return _run(e, prompts, n)
    finally:
        e.close()


@pytest.fixture(params=["glm4", "dsa"])
def mtp_ckpt(request, tiny_glm4_mtp, tiny_dsa_mtp):
    return tiny_glm4_mtp if request.param == "glm4" else tiny_dsa_mtp


# ---- the MTP layer itself ----------------------------------------------------------------------
def test_mtp_layer_matches_reference(mtp_ckpt):
    from tests.mtp_reference import mtp_logits

    cfg = load_config(mtp_ckpt)
    model = build_model(cfg, Checkpoint(mtp_ckpt), torch.float32, "cpu", mtp=True)
    assert model.kv_layers == cfg.num_layers + 1
    ids = _prompts(3, 1, longest=40)[0] + [9] * 20  # past index_topk: DSA selects
    t, ps = len(ids), 4
    pool = KVPool(model.kv_layers, -(-t // ps), ps, cfg.plane_widths(), torch.float32, "cpu")
    rows = token_rows(list(range(pool.num_slots)), 0, t, ps)
    ids_t, pos = torch.tensor(ids), torch.arange(t)
    fb = ForwardBatch(ids_t, pos, rows, [SeqChunk(0, t, 0, rows, n_logits=t)])
    _, hidden = model.forward(fb, pool, keep_hidden=True)
    prev = torch.cat([torch.zeros_like(hidden[:1]), hidden[:-1]])  # g_q = hidden at q - 1
    got, _ = model.draft(fb, pool, prev)
    want = mtp_logits(mtp_ckpt, ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_speculative_needs_mtp_layers(tiny_glm4):
    with pytest.raises(KvscopeError, match="no MTP layers"):
        _engine(tiny_glm4, 2)
    e = _engine(tiny_glm4, None)  # auto: off without MTP layers
    assert e.drafter is None
    e.close()


def test_auto_speculation_with_mtp_layers(tiny_glm4_mtp):
    e = _engine(tiny_glm4_mtp, None)
    assert e.drafter is not None and e.pool.num_layers == e.model_config.num_layers + 1
    e.close()
    e = _engine(tiny_glm4_mtp, 0)
    assert e.drafter is None and e.pool.num_layers == e.model_config.num_layers
    e.close()


# ---- lossless ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculation_is_lossless(mtp_ckpt, k):
    prompts = _prompts(0, 6)
    ref = _reference(mtp_ckpt, prompts)
    e = _engine(mtp_ckpt, k)
    assert _run(e, prompts) == ref  # the MTP's own drafts
    e.close()
    e = _engine(mtp_ckpt, k)
    full = {f"r{i}": p + ref[f"r{i}"] for i, p in enumerate(prompts)}
    _oracle(e, full, corrupt=0.3)
    assert _run(e, prompts) == ref
    lengths = {e.request(f"r{i}").spec.accept_length for i in range(len(prompts))}
    assert max(lengths) > 1.5  # drafts were accepted, several at a time
    e.close()


def test_rejected_rows_are_never_read(mtp_ckpt):
    """Every dead row (rejected drafts, provisional chain rows) poisoned after every step:
    no output changes, so no read reached one."""
    prompts = _prompts(1, 5)
    ref = _reference(mtp_ckpt, prompts)
    e = _engine(mtp_ckpt, 3)
    full = {f"r{i}": p + ref[f"r{i}"] for i, p in enumerate(prompts)}
    _oracle(e, full, corrupt=0.4)
    assert _run(e, prompts, poison=True) == ref
    e.close()


def test_prefix_hits_keep_mtp_rows_exact(tiny_dsa_mtp):
    """A prompt served from the prefix cache drafts exactly as when computed cold: MTP rows
    of cached pages are valid, and the first uncached row is computed from the recomputed
    hidden state of the last cached position (SeqWork.lead_token)."""
    prompt = _prompts(2, 1, longest=2)[0] + list(range(20, 43))  # several full pages
    drafts: list[list] = []
    e = _engine(tiny_dsa_mtp, 2)
    real = e.sched.set_drafts

    def record(rid, d):
        drafts[-1].append(tuple(d))
        real(rid, d)

    e.sched.set_drafts = record
    outs = []
    for i in range(2):
        drafts.append([])
        rid = e.submit(prompt_ids=prompt, max_new_tokens=8, ignore_eos=True, request_id=f"p{i}")
        while e.has_work():
            e.step()
        outs.append(e.request(rid).output_ids)
    assert e.request("p1").cached_tokens["L1"] > 0  # the second one hit the prefix cache
    assert outs[0] == outs[1] and drafts[0] == drafts[1]
    e.close()


def test_lossless_under_pressure_with_tier_round_trips(tmp_path, tiny_glm4_mtp):
    """A small L1 pool, L2 and L3: preemptions, backups and load-backs mid-speculation."""
    prompts = _prompts(4, 10, longest=24) * 2  # repeats: prefix hits from every tier
    probe = _engine(tiny_glm4_mtp, 2)
    bpp = probe.pool.bytes_per_page
    probe.close()
    kw = dict(kv_mem=24 * bpp, kv_host_mem=24 * bpp, kv_disk=str(tmp_path / "l3"))
    ref = _reference(tiny_glm4_mtp, prompts, n=16)
    e = _engine(tiny_glm4_mtp, 2, **kw)
    full = {f"r{i}": p + ref[f"r{i}"] for i, p in enumerate(prompts)}
    _oracle(e, full, corrupt=0.3)
    assert _run(e, prompts, n=16) == ref
    st = e.kv.tiers.stats()
    assert e.sched.preemptions > 0 or st.evictions > 0
    e.close()


def test_no_page_leaks_after_many_random_requests(tiny_glm4_mtp):
    """Random requests, lengths, aborts and drafts: every page ends FREE or CACHED."""
    rng = random.Random(5)
    e = _engine(tiny_glm4_mtp, 3, max_running=32)
    live: list[str] = []
    for i in range(1000):
        p = [rng.randrange(5, 200) for _ in range(rng.randrange(1, 12))]
        live.append(e.submit(prompt_ids=p, max_new_tokens=rng.randrange(1, 8), ignore_eos=True))
        if rng.random() < 0.1:  # abort one in flight: safe reclaim mid-speculation
            e.abort(live[rng.randrange(len(live))])
        if i % 6 == 0:
            for _ in range(rng.randrange(1, 4)):
                e.step()
                e.sched.check_invariants()
    while e.has_work():
        e.step()
        e.sched.check_invariants()
    counts = e.kv.alloc.counts()
    assert counts["FREE"] + counts["CACHED"] == e.pool.num_slots, counts
    assert not any(rec.owners or rec.writers for rec in e.kv.alloc.records)
    e.close()


# ---- sampled acceptance: the output distribution is the target's --------------------------------
def _chi_square_p(observed: list[int], expected: list[float]) -> float:
    """Upper tail of the chi-square statistic (Wilson-Hilferty approximation)."""
    stat = sum((o - x) ** 2 / x for o, x in zip(observed, expected, strict=True) if x > 0)
    dof = sum(1 for x in expected if x > 0) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_keeps_the_target_distribution(k):
    """Drafts from a distribution q unlike the target p: the first emitted token (and the one
    after an accepted draft) follow p, by a chi-square test over many samples."""
    v, n = 8, 20000
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    logits = torch.randn((k + 1, v), generator=gen) * 1.5
    q = torch.softmax(torch.randn((k, v), generator=gen), -1)
    p = torch.softmax(logits, -1)
    first = [0] * v
    lengths = 0
    for _ in range(n):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
        got = accept(logits, drafts, q, params, gen)
        first[got[0]] += 1
        lengths += len(got)
    assert _chi_square_p(first, [float(x) * n for x in p[0]]) > 1e-3
    assert 1.0 < lengths / n < k + 1  # some drafts accepted, some rejected


def test_greedy_acceptance_rule():
    logits = torch.full((4, 6), -5.0)
    for i, t in enumerate([2, 3, 1, 4]):
        logits[i, t] = 5.0
    g = torch.Generator()
    params = SamplingParams()
    assert accept(logits, [2, 3, 1], None, params, g) == [2, 3, 1, 4]  # all, then the bonus
    assert accept(logits, [2, 0, 1], None, params, g) == [2, 3]  # stops at the first miss
    assert accept(logits, [5, 3, 1], None, params, g) == [2]


def test_sampled_speculation_in_the_engine(tiny_glm4_mtp):
    """Temperature sampling with speculation on: the second generated token (the first
    verified one) follows the same distribution as without speculation (two-sample test)."""
    prompt = [11, 12, 13, 14, 15]
    counts = {}
    for spec in (0, 2):
        e = _engine(tiny_glm4_mtp, spec, max_running=64)
        c: dict[int, int] = {}
        rids = [
            e.submit(
                prompt_ids=prompt,
                max_new_tokens=3,  # the second token comes from a verify step
                temperature=1.5,
                top_k=6,
                seed=1000 * spec + i,
                ignore_eos=True,
            )
            for i in range(600)
        ]
        e.run_until_done()
        for rid in rids:
            out = e.request(rid).output_ids
            c[(out[0], out[1])] = c.get((out[0], out[1]), 0) + 1
        counts[spec] = c
        if spec:
            assert any(e.request(r).spec for r in rids)
        e.close()
    keys = sorted(set(counts[0]) | set(counts[2]))
    a = [counts[0].get(k, 0) for k in keys]
    b = [counts[2].get(k, 0) for k in keys]
    keep = [i for i in range(len(keys)) if a[i] + b[i] >= 10]  # pool rare cells
    rest_a = sum(a) - sum(a[i] for i in keep)
    rest_b = sum(b) - sum(b[i] for i in keep)
    a = [a[i] for i in keep] + [rest_a]
    b = [b[i] for i in keep] + [rest_b]
    stat = sum((x - y) ** 2 / (x + y) for x, y in zip(a, b, strict=True) if x + y)
    dof = sum(1 for x, y in zip(a, b, strict=True) if x + y) - 1
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    assert 0.5 * math.erfc(z / math.sqrt(2)) > 1e-3


# ---- the compiled CPU steps -------------------------------------------------------------------
def _uncompiled(self, bucket):
    """CpuDecodeGraph._compile without compiling: the same tensor function, run as is."""
    return lambda step, *args: step(*args)


def test_speculation_through_the_cpu_graph_steps(mtp_ckpt, monkeypatch):
    """The verify and MTP steps as the compiled CPU graph runs them (fixed shapes: k + 1 rows
    per sequence, gathered contexts, rows stored after the step) emit the eager tokens."""
    from runtime.models.cpu_graph import CpuDecodeGraph

    monkeypatch.setenv("KVSCOPE_CPU_GRAPH", "1")
    monkeypatch.setattr(CpuDecodeGraph, "_compile", _uncompiled)
    prompts = _prompts(6, 5)
    ref = _reference(mtp_ckpt, prompts)
    e = Engine(mtp_ckpt, EngineConfig(page_size=4, speculative=2, cpu_graph="auto"))
    full = {f"r{i}": p + ref[f"r{i}"] for i, p in enumerate(prompts)}
    _oracle(e, full, corrupt=0.3)
    for _ in range(3):  # the first run queues the buckets, later ones use them
        got = _run(e, prompts, poison=True)
        assert got == ref
        for r in list(got):
            e.forget(r)
        e.cpu_graph.wait_idle(60)
    kinds = {b[2] for b in e.cpu_graph.buckets_ready if len(b) > 2}
    assert kinds == {"verify", "mtp"} and e.cpu_graph.steps_compiled > 0
    # Every draft accepted: the extend after a verify still has its fixed k + 1 rows and runs
    # through its compiled bucket (it once ran eagerly whenever all drafts were accepted).
    eager = []
    real = e.model.draft
    e.model.draft = lambda b, *a, **kw: eager.append([s.n for s in b.seqs]) or real(b, *a, **kw)
    _oracle(e, full, corrupt=0.0)
    assert _run(e, prompts) == ref
    assert not [ns for ns in eager if all(n == 3 for n in ns)], eager
    e.close()


def test_speculation_through_the_triton_kernels(tiny_dsa_mtp, monkeypatch):
    """The kernel step backend (Triton, here its CPU interpreter): page-table kernels with the
    lead token unstored (slot -1), the MTP layer's rows, verify rows; same tokens as eager."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prompts = [p[:10] for p in _prompts(7, 2)]
    ref = _reference(tiny_dsa_mtp, prompts, n=5)
    monkeypatch.setenv("KVSCOPE_TRITON_INTERPRET", "1")
    e = _engine(tiny_dsa_mtp, 2)
    assert e.runner.kernels
    full = {f"r{i}": p + ref[f"r{i}"] for i, p in enumerate(prompts)}
    _oracle(e, full, corrupt=0.3)
    assert _run(e, prompts, n=5) == ref
    e.forget("r0")
    rid = e.submit(prompt_ids=prompts[0], max_new_tokens=3, ignore_eos=True, request_id="r0")
    e.run_until_done()  # a prefix hit: the lead token
    assert e.request(rid).output_ids == ref["r0"][:3]
    e.close()


def test_bucket_names():
    from runtime.models.runner import bucket_name

    assert bucket_name((1, 64)) == "b1x64"
    assert bucket_name([8, 128, "verify", 3]) == "verify3-b8x128"  # as bench JSON lists them


def test_demo_speculation_is_lossless_and_accepts():
    """The shipped demo with its trained MTP layer: the same greedy text with 2 and 3 drafts as
    without, over a mixed batch, and drafts mostly accepted (its held-out top-1 agreement with
    the main model is 0.82: assets/demo/metrics.json)."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "assets" / "demo"
    prompts = ["The function returns", "An exception is raised if the", "Return a list of"]
    outs, lengths = {}, {}
    for k in (0, 2, 3):
        e = Engine(demo, EngineConfig(speculative=k, cpu_graph="off", page_size=16))
        rids = [e.submit(p, max_new_tokens=24, ignore_eos=True) for p in prompts]
        e.run_until_done()
        outs[k] = [e.request(r).output_ids for r in rids]
        lengths[k] = [e.request(r).spec.accept_length for r in rids] if k else []
        e.close()
    assert outs[2] == outs[0] and outs[3] == outs[0]
    assert min(lengths[2]) > 1.5 and min(lengths[3]) > 1.5


def test_acceptance_flags_a_request_whose_target_kv_went_bad():
    """The incident's signal: when the target reads corrupted KV that the draft layer does not
    (one reader's stale rows, as the DSA indexer-key cache in the incident), drafts stop being
    accepted and the acceptance detector flags the request as garbled. Here the main layers'
    rows of one demo request are overwritten with noise mid-generation; its MTP rows are not."""
    from pathlib import Path

    from runtime.integrity.config import IntegrityConfig

    demo = Path(__file__).resolve().parents[2] / "assets" / "demo"
    prompts = ["The function returns", "This method is called when"]
    ic = IntegrityConfig(accept_after_tokens=16, accept_window=8)
    e = Engine(demo, EngineConfig(speculative=2, cpu_graph="off", page_size=16, integrity=ic))
    rids = [e.submit(p, max_new_tokens=48, ignore_eos=True) for p in prompts]
    for _ in range(6):
        e.step()
    g = torch.Generator().manual_seed(0)
    seq = e.sched.get(rids[0])
    rows = token_rows(seq.pages, 0, seq.computed, 16)
    for layer in range(e.model_config.num_layers):  # the main layers only
        for plane in e.pool.planes:
            flat = e.pool.flat(layer, plane)
            flat[rows] += torch.randn(flat[rows].shape, generator=g) * flat[rows].std() * 3
    e.run_until_done()
    garbled = {ev.request_id for ev in e.monitor.events if ev.detail.startswith("accept length")}
    assert garbled == {rids[0]}
    assert e.request(rids[0]).verdict == "suspect"
    e.close()


@pytest.mark.parametrize("max_new", [1, 2, 3, 6])
def test_last_steps_verify_every_draft_and_stop_at_the_length(tiny_glm4_mtp, max_new):
    """A request's last steps verify all k drafts even past its last token (one verify shape
    per k, so compiled steps serve them): it still ends at exactly max_new_tokens with the
    tokens of a run without drafts, and its stats count only the drafts it could keep."""
    prompts = _prompts(11, 4)
    ref = _run(_engine(tiny_glm4_mtp, 0), prompts, n=max_new)
    e = _engine(tiny_glm4_mtp, 3)
    seen = []  # (drafts verified, tokens the request could still take) per verify
    real_step = e.sched.step

    def step():
        batch = real_step()
        for w in batch.seqs:
            if w.n_draft:
                seq = e.sched.get(w.request_id)
                seen.append((w.n_draft, seq.max_new_tokens - len(seq.output)))
        return batch

    e.sched.step = step
    full = {f"r{i}": p + ref[f"r{i}"] + [7] * 4 for i, p in enumerate(prompts)}
    _oracle(e, full, corrupt=0.0)  # every draft right: the verify runs into the length
    got = _run(e, prompts, n=max_new)
    assert got == ref and all(len(t) == max_new for t in got.values())
    assert all(n == 3 for n, _ in seen)  # never fewer drafts at the tail
    if max_new > 1:
        assert any(left <= 3 for _, left in seen)  # some verify reached past the last token
    for rid in got:
        s = e.request(rid).spec
        if s is not None:
            assert s.accepted + s.steps <= max_new  # tokens it took from verify steps
            assert all(d <= max_new - 1 and a <= d for d, a in s.history)
