"""The official `openai` client against a real uvicorn server on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from app.serve.protocol import Limits
from app.serve.server import ServeOptions, create_app
from runtime.engine import Engine, EngineConfig
from tests.app.serve_helpers import (
    ScriptedEngine,
    SlowEngine,
    UvicornThread,
    quiescent_pages,
    write_glm_checkpoint,
)

KEY = "sk-test-123"
SCRIPT = (
    "<think>Weather needs the tool.</think>\n"
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_glm_checkpoint(tmp_path_factory.mktemp("glm_openai"))


@pytest.fixture(scope="module")
def server(ckpt):
    """Requests whose prompt lists tools get the scripted reply text (ScriptedEngine)."""
    real = Engine(ckpt, EngineConfig(device="cpu", page_size=4, max_running=4))
    engine = ScriptedEngine(real, SCRIPT, when=lambda p: "<tools>" in (p or ""))
    app = create_app(engine, ServeOptions(model_name="glm-test", api_key=KEY))
    with UvicornThread(app) as srv:
        srv.engine = engine
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        yield srv


MSG = [{"role": "user", "content": "Tell me something about the sea."}]


def test_chat_non_streaming_and_streaming_agree(server):
    c = server.client
    r = c.chat.completions.create(model="glm-test", messages=MSG, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1
    stream = c.chat.completions.create(
        model="glm-test",
        messages=MSG,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts).strip() == (r.choices[0].message.content or "")
    assert usage.completion_tokens == r.usage.completion_tokens
    # the same prompt again: its prefix pages are served from the cache
    assert usage.prompt_tokens_details.cached_tokens > 0
    assert r.model_extra["kvscope"]["verdict"] in ("ok", "suspect")  # random model: odd chars


def test_completions(server):
    c = server.client
    r = c.completions.create(model="glm-test", prompt="Once upon a", max_tokens=6, temperature=0)
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="glm-test", prompt="Once upon a", max_tokens=6, temperature=0, stream=True
        )
        if ch.choices
    )
    assert text == r.choices[0].text and r.usage.prompt_tokens > 0


def test_tool_call_round_trip_and_reasoning(server):
    c = server.client
    r = c.chat.completions.create(
        model="glm-test",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        max_tokens=40,
        temperature=0,
    )
    msg = r.choices[0]
    assert msg.finish_reason == "tool_calls" or msg.finish_reason == "length"
    call = msg.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert msg.message.model_extra["reasoning_content"] == "Weather needs the tool."
    assert not msg.message.content
    prompt = list(server.engine.prompts.values())[-1]
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt  # tools reached the template

    # streaming: the same call, reasoning in its own deltas
    calls, reasoning = [], ""
    for ch in c.chat.completions.create(
        model="glm-test",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        max_tokens=40,
        temperature=0,
        stream=True,
    ):
        if ch.choices:
            d = ch.choices[0].delta
            calls += d.tool_calls or []
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert reasoning == "Weather needs the tool."

    # round trip: the assistant's call and the tool result go back through the template
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        msg.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    c.chat.completions.create(
        model="glm-test", messages=history, tools=TOOLS, max_tokens=4, temperature=0
    )
    prompt = list(server.engine.prompts.values())[-1]
    assert "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>" in prompt
    assert "<arg_value>2</arg_value>" in prompt
    assert '<|observation|>\n<tool_response>\n{"temp": 21}\n</tool_response>' in prompt


def test_key_required_and_4xx_bodies(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server.url + "/v1/completions", json={"model": "glm-test", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    c = server.client
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="glm-test", messages=MSG, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSG)


@pytest.fixture(scope="module")
def slow_server(ckpt):
    real = Engine(ckpt, EngineConfig(device="cpu", page_size=4, max_running=1))
    engine = SlowEngine(real, 0.03)
    opts = ServeOptions(model_name="glm-test", max_waiting=0, limits=Limits(max_tokens=200))
    app = create_app(engine, opts)
    with UvicornThread(app) as srv:
        srv.engine, srv.runner = real, app.state.runner
        yield srv


def _long_stream(url):
    body = {"model": "glm-test", "prompt": "a b c d e f g", "max_tokens": 200, "stream": True}
    return httpx.stream("POST", url + "/v1/completions", json=body, timeout=30)


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_429_when_the_queue_is_full_then_disconnect_aborts(slow_server):
    runner = slow_server.runner
    with _long_stream(slow_server.url) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        assert json.loads(first[6:])["choices"]
        c = openai.OpenAI(base_url=slow_server.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="glm-test", prompt="hi", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "server_busy"
        aborted = runner.finish_reasons["abort"]
    # the client went away mid-stream (unless the random model hit EOS first)
    _wait(lambda: runner.in_flight == 0 and not slow_server.engine.has_work())
    reasons = slow_server.runner.finish_reasons
    assert reasons["abort"] == aborted + 1 or reasons["stop"] >= 1, reasons
    quiescent_pages(slow_server.engine)
    # and the server still answers
    c = openai.OpenAI(base_url=slow_server.url + "/v1", api_key="none", max_retries=0)
    assert c.completions.create(model="glm-test", prompt="hi", max_tokens=2).choices


def test_non_streamed_request_of_a_departed_client_is_aborted(slow_server):
    runner = slow_server.runner
    before = runner.finish_reasons["abort"]
    body = {"model": "glm-test", "prompt": "a b c d", "max_tokens": 200, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(slow_server.url + "/v1/completions", json=body, timeout=0.5)
    _wait(lambda: runner.in_flight == 0 and not slow_server.engine.has_work())
    assert runner.finish_reasons["abort"] == before + 1
    quiescent_pages(slow_server.engine)
