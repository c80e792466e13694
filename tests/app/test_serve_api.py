"""In-process ASGI tests of the server (fastapi TestClient) on a GLM-format test checkpoint."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.serve.protocol import Limits
from app.serve.server import ServeOptions, create_app
from runtime.engine import Engine, EngineConfig
from tests.app.serve_helpers import write_glm_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_glm_checkpoint(tmp_path_factory.mktemp("glm_serve"))


@pytest.fixture(scope="module")
def client(ckpt):
    engine = Engine(ckpt, EngineConfig(device="cpu", page_size=4, max_running=4))
    opts = ServeOptions(model_name="glm-test", limits=Limits(max_body_bytes=4096, max_tokens=64))
    with TestClient(create_app(engine, opts)) as c:
        c.engine = engine
        yield c


def _chat(**kw):
    body = {"model": "glm-test", "messages": [{"role": "user", "content": "Hello there"}]}
    body.update(temperature=0, max_tokens=8)
    body.update(kw)
    return body


def _events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["glm-test"]


def test_chat_through_the_template_usage_and_prefix_cache(client):
    tok = client.engine.tokenizer
    messages = [
        {"role": "system", "content": "You are a terse assistant. " * 4},
        {"role": "user", "content": "Name a colour."},
    ]
    first = client.post("/v1/chat/completions", json=_chat(messages=messages)).json()
    rendered = tok.apply_chat_template(messages)
    assert rendered.startswith("[gMASK]<sop><|system|>") and rendered.endswith("<|assistant|>")
    u = first["usage"]
    assert u["prompt_tokens"] == len(tok.encode(rendered))
    assert 1 <= u["completion_tokens"] <= 8
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert first["kvscope"]["verdict"] != "corrupt" and first["kvscope"]["violations"] == []
    second = client.post("/v1/chat/completions", json=_chat(messages=messages)).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # every full page of the prompt but the last token's is a prefix hit (page size 4)
    assert cached >= (u["prompt_tokens"] - 1) // 4 * 4 - 4 > 0
    assert cached == sum(second["kvscope"]["cached_tokens"].values())
    assert second["choices"][0]["message"] == first["choices"][0]["message"]  # greedy


def test_streamed_chat_equals_non_streamed(client):
    whole = client.post("/v1/chat/completions", json=_chat()).json()
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json=_chat(stream=True, stream_options={"include_usage": True}),
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    reasoning = "".join(
        c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"]
    )
    msg = whole["choices"][0]["message"]
    assert text.strip() == (msg["content"] or "")
    assert reasoning.strip() == (msg.get("reasoning_content") or "")
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"] | {
        "prompt_tokens_details": usage_chunk["usage"]["prompt_tokens_details"]
    }
    assert "kvscope" in usage_chunk


def test_completions_stream_and_not(client):
    body = {"model": "glm-test", "prompt": "The cat sat on", "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["finish_reason"] in ("stop", "length")
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        events = _events(r)
    text = "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-2]["kvscope"]["verdict"] in ("ok", "suspect")  # extension on the last
    ids = client.post("/v1/completions", json=body | {"prompt": [5, 6, 7, 8]}).json()
    assert ids["usage"]["prompt_tokens"] == 4


def test_seeded_sampling_is_reproducible(client):
    body = _chat(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8)
    a = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    b = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert a == b


def _error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        (_chat(model="gpt-5"), 404, "model"),
        (_chat(n=2), 400, "n"),
        (_chat(max_tokens=65), 400, "max_tokens"),
        (_chat(max_completion_tokens=0), 400, "max_completion_tokens"),
        (_chat(temperature="hot"), 400, "temperature"),
        (_chat(top_p=0), 400, "top_p"),
        (_chat(stop=[1, 2]), 400, "stop"),
        (_chat(messages=[]), 400, "messages"),
        (_chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0]"),
        (_chat(stream="yes"), 400, "stream"),
        (_chat(stream_options={"include_usage": True}), 400, "stream_options"),
        (_chat(tools=[{"type": "nope"}]), 400, "tools"),
        (_chat(tool_choice="required"), 400, "tool_choice"),
    ],
)
def test_bad_fields_get_openai_error_bodies(client, body, status, param):
    _error(client.post("/v1/chat/completions", json=body), status, param)


def test_malformed_and_oversized_bodies(client):
    _error(client.post("/v1/chat/completions", content=b"{not json"), 400)
    _error(client.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    _error(client.post("/v1/completions", content=b"x" * 5000), 413)
    _error(client.post("/v1/completions", json={"model": "glm-test", "prompt": ""}), 400, "prompt")
    _error(client.get("/v1/nothing"), 404)
    _error(client.get("/v1/chat/completions"), 405)


def test_prompt_over_the_context_is_a_400_from_the_engine(client):
    body = {"model": "glm-test", "prompt": [7] * 600, "max_tokens": 4}  # context is 512
    err = _error(client.post("/v1/completions", json=body), 400)
    assert "context" in err["message"]


def test_metrics_text(client):
    client.post("/v1/completions", json={"model": "glm-test", "prompt": "a b", "max_tokens": 2})
    import time

    time.sleep(0.3)  # the runner publishes a snapshot every 0.25 s
    text = client.get("/metrics").text
    for name in (
        'kvscope_tier_pages_used{tier="L1"}',
        'kvscope_prefix_hits_total{tier="L1"}',
        "kvscope_decode_tokens_per_second",
        "kvscope_requests_running",
        "kvscope_requests_waiting",
        'kvscope_requests_by_verdict_total{verdict="ok"}',
        "kvscope_expert_cache_hits_total",
    ):
        assert name in text, name
    ok = [
        ln
        for ln in text.splitlines()
        if ln.startswith('kvscope_requests_by_verdict_total{verdict="ok"}')
    ]
    assert int(ok[0].split()[-1]) >= 1


def test_snapshot_stream_rebuilds_telemetry(client):
    from inspector.remote import snapshot_from_json

    with client.stream("GET", "/kvscope/v1/snapshots?limit=1") as r:
        data = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    snap = snapshot_from_json(json.loads(data[0]))
    assert snap.page_size == 4 and len(snap.pages) == client.engine.pool.num_slots
    assert {t.tier for t in snap.tiers} == {"L1", "L2", "L3"}


class _Broken:
    """TEST DOUBLE: a real Engine whose step() raises (a bug inside the engine)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        raise RuntimeError("boom")


def test_timeouts_and_a_failing_engine_get_error_bodies(ckpt):
    from tests.app.serve_helpers import SlowEngine

    slow = SlowEngine(Engine(ckpt, EngineConfig(device="cpu", page_size=4)), 0.05)
    opts = ServeOptions(model_name="glm-test", request_timeout_s=0.2)
    body = {"model": "glm-test", "prompt": "a b c", "max_tokens": 64, "temperature": 0}
    with TestClient(create_app(slow, opts)) as c:
        err = _error(c.post("/v1/completions", json=body), 504)
        assert err["code"] == "timeout"
        with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = _events(r)
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout"
    broken = _Broken(Engine(ckpt, EngineConfig(device="cpu", page_size=4)))
    with TestClient(create_app(broken, ServeOptions(model_name="glm-test"))) as c:
        err = _error(c.post("/v1/completions", json=body), 500)
        assert "boom" in err["message"] and err["type"] == "server_error"
        assert c.get("/health").status_code == 503
        _error(c.post("/v1/completions", json=body), 503)  # refused while unhealthy


def test_glm5_style_template_opens_think_and_compact_tool_calls(tmp_path):
    """The template ends with `<|assistant|><think>`: the reply starts inside the reasoning.
    The reply text is scripted (ScriptedEngine, a test double over the real engine)."""
    from tests.app.serve_helpers import ScriptedEngine, write_glm5_style_checkpoint

    ckpt = write_glm5_style_checkpoint(tmp_path / "glm5")
    script = (
        "Need the tool.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key>"
        "<arg_value>Oslo</arg_value><arg_key>days</arg_key><arg_value>[1, 2]</arg_value>"
        "</tool_call>"
    )
    real = Engine(ckpt, EngineConfig(device="cpu", page_size=4))
    engine = ScriptedEngine(real, script, chunk=5)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    body = _chat(tools=tools, max_tokens=40, model="glm5")
    with TestClient(create_app(engine, ServeOptions(model_name="glm5"))) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        prompt = next(iter(engine.prompts.values()))
        assert prompt.endswith("<|assistant|><think>") and "<tools>" in prompt
        msg = r["choices"][0]["message"]
        assert msg["reasoning_content"] == "Need the tool."
        assert msg["content"] == "Checking."
        (call,) = msg["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "days": [1, 2]}
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            chunks = [e for e in _events(s)[:-1] if e["choices"]]
        deltas = [e["choices"][0]["delta"] for e in chunks]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "Need the tool."
        assert "".join(d.get("content", "") for d in deltas) == "Checking."
        calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
        assert [tc["function"]["name"] for tc in calls] == ["get_weather"]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("tool_calls", "length")
