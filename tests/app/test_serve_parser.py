"""The GLM output parser on its own: tool calls, <think> reasoning, tags split across deltas."""

from __future__ import annotations

import json
import random

import pytest

from app.serve.glm_parser import GlmParser, parse_reply, parse_tool_call

REPLY = (
    "<think>The user wants weather; call the tool.</think>\n"
    "Let me check.<tool_call>get_weather\n"
    "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
    '<arg_key>opts</arg_key>\n<arg_value>{"unit": "C"}</arg_value>\n'
    "</tool_call>"
)


def test_whole_reply_splits_reasoning_content_and_calls():
    r = parse_reply(REPLY)
    assert r.reasoning == "The user wants weather; call the tool."
    assert r.content == "Let me check."
    assert len(r.tool_calls) == 1 and r.tool_calls[0].name == "get_weather"
    # values JSON-decoded when they parse, else strings
    assert json.loads(r.tool_calls[0].arguments) == {
        "city": "Paris",
        "days": 3,
        "opts": {"unit": "C"},
    }


def test_two_calls_and_no_args():
    r = parse_reply(
        "<tool_call>now</tool_call>"
        "<tool_call>f\n<arg_key>a</arg_key><arg_value>x y</arg_value></tool_call>"
    )
    assert [c.name for c in r.tool_calls] == ["now", "f"]
    assert json.loads(r.tool_calls[0].arguments) == {}
    assert json.loads(r.tool_calls[1].arguments) == {"a": "x y"}
    assert r.content is None and r.reasoning is None


def test_plain_text_and_lookalikes_stay_content():
    assert parse_reply("a < b and <thin").content == "a < b and <thin"
    assert parse_reply("x <tool_call>unfinished").content == "x <tool_call>unfinished"
    assert parse_tool_call("") is None
    assert parse_reply("<tool_call></tool_call>").content == "<tool_call></tool_call>"


def test_template_opened_think_block():
    r = parse_reply("thinking here</think>answer", in_think=True)
    assert (r.reasoning, r.content) == ("thinking here", "answer")


@pytest.mark.parametrize("seed", range(20))
def test_streaming_any_split_equals_whole(seed):
    """Every split of the text into deltas gives the same pieces; no partial tag leaks."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(REPLY)), rng.randint(1, 40)))
    deltas = [REPLY[a:b] for a, b in zip([0, *cuts], [*cuts, len(REPLY)], strict=True)]
    p = GlmParser()
    pieces = []
    for d in deltas:
        got = p.feed(d)
        for x in got:
            assert "<" not in x.text or x.kind != "reasoning", x  # no tag fragment in reasoning
            assert not x.text.endswith(("<", "<t", "<th", "<tool", "</")), x
        pieces += got
    pieces += p.finish()
    content = "".join(x.text for x in pieces if x.kind == "content").strip()
    reasoning = "".join(x.text for x in pieces if x.kind == "reasoning")
    calls = [x.call for x in pieces if x.kind == "tool_call"]
    whole = parse_reply(REPLY)
    assert content == whole.content and reasoning == whole.reasoning
    assert calls == whole.tool_calls


def test_held_back_tail_is_flushed_at_finish():
    p = GlmParser()
    assert [x.text for x in p.feed("hello <too")] == ["hello "]
    assert [x.text for x in p.finish()] == ["<too"]
