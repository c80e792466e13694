"""The engine's step calls its hooks at the named points of runtime/step_hooks.py, in order,
and hooks see the KV handles only."""

from __future__ import annotations

import pytest

from runtime.engine import Engine, EngineConfig
from runtime.errors import RequestError
from runtime.step_hooks import StepHandles, StepHooks


class Recorder(StepHooks):
    def __init__(self):
        self.calls: list[str] = []

    def before_forward(self, batch, checks):
        assert set(checks.pages) == {w.request_id for w in batch.seqs}
        self.calls.append("before_forward")

    def after_forward(self, batch, checks):
        self.calls.append("after_forward")

    def check_sample(self, rid, tokens, logits, pages, checks):
        self.calls.append("check_sample")
        return None

    def after_commit(self, batch, checks):
        self.calls.append("after_commit")
        return []

    def end_step(self):
        self.calls.append("end_step")

    def idle(self):
        self.calls.append("idle")


def test_points_come_in_data_path_order(tiny_glm4):
    e = Engine(tiny_glm4, EngineConfig(device="cpu", page_size=4))
    rec = Recorder()
    e.hooks = (*e.hooks, rec)
    rid = e.submit(prompt_ids=[3, 4, 5, 6, 7], max_new_tokens=3)
    e.run_until_done()
    assert len(e.request(rid).output_ids) == 3
    steps = " ".join(rec.calls).split("end_step")
    assert steps[-1] == ""
    for s in steps[:-1]:  # one step that computed something each
        names = s.split()
        assert names[:2] == ["before_forward", "after_forward"], names
        assert names[-1] == "after_commit", names
        assert set(names[2:-1]) <= {"check_sample"}
    assert sum(n == "check_sample" for n in rec.calls) == 3  # one per sampled token
    e.close()


def test_integrity_hooks_hold_handles_not_the_engine(tiny_glm4):
    e = Engine(tiny_glm4, EngineConfig(device="cpu"))
    for hook in (e.monitor, e.monitor.faults):
        assert isinstance(hook.kv, StepHandles)
        assert not any(isinstance(v, Engine) for v in vars(hook).values())
    assert e.monitor.kv.pool is e.pool and e.monitor.kv.tiers is e.kv.tiers
    e.close()


def test_requests_view_is_read_only_and_forget_drops_finished(tiny_glm4):
    e = Engine(tiny_glm4, EngineConfig(device="cpu"))
    rid = e.submit(prompt_ids=[3, 4, 5], max_new_tokens=2)
    with pytest.raises(TypeError):
        e.requests["x"] = None
    with pytest.raises(RequestError, match="still running"):
        e.forget(rid)
    e.run_until_done()
    assert e.snapshot().requests[0].request_id == rid
    e.forget(rid)
    assert rid not in e.requests and e.snapshot().requests == ()
    assert e.snapshot().tokens_generated == 2
    e.close()
