"""ChatSession and TelemetryHistory: the plain data behind the screens."""

from __future__ import annotations

from inspector.history import TelemetryHistory
from inspector.transcript import ChatSession
from runtime.telemetry import TokenEvent, TokenVerdict
from tests.inspector.fake_engine import FakeEngine


def ev(rid, i, text, verdict="ok", finished=False, reason=None):
    return TokenEvent(rid, i, 100 + i, text, TokenVerdict(verdict), finished, reason)


def test_conversation_round_trip():
    s = ChatSession()
    s.send("hi", "r1")
    assert s.messages() == [{"role": "user", "content": "hi"}]
    changed = s.apply([ev("r1", 0, "Hello"), ev("r1", 1, " there", "suspect", True, "stop")])
    assert changed == {"r1"} and s.active is None
    reply = s.reply("r1")
    assert reply.text == "Hello there" and reply.finish_reason == "stop"
    assert reply.verdict_counts() == {"ok": 1, "suspect": 1}
    s.send("more", "r2")
    assert s.messages()[1:] == [
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "more"},
    ]


def test_stop_ignores_late_tokens_and_foreign_requests():
    s = ChatSession()
    s.send("hi", "r1")
    s.apply([ev("r1", 0, "a")])
    assert s.stop() == "r1" and s.stop() is None
    assert s.apply([ev("r1", 1, "b"), ev("batch-7", 0, "x")]) == set()
    assert s.reply("r1").text == "a" and s.reply("r1").finish_reason == "abort"


def test_failed_reply_is_left_out_of_the_conversation():
    s = ChatSession()
    s.send("hi", "r1")
    s.fail("r1", "ValueError: too long")
    assert s.active is None and s.reply("r1").error
    assert s.messages() == [{"role": "user", "content": "hi"}]
    s.clear()
    assert not s.turns and s.reply("r1") is None


def test_history_records_only_when_the_engine_clock_moves():
    engine = FakeEngine(seed=0)
    h = TelemetryHistory(maxlen=5)
    assert h.add(engine.snapshot())
    assert not h.add(engine.snapshot())  # idle engine: same clock, no point
    engine.submit("hello " * 10, max_new_tokens=12, request_id="a")
    for _ in range(8):
        engine.step()
        h.add(engine.snapshot())
    assert len(h) == 5 and list(h.time) == sorted(h.time)
    assert h.tier_pct["L1"][-1] > 0 and max(h.decode_tps) > 0
    assert h.ttft == {"a": (0.02, 0.02)}
