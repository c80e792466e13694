"""`kvscope serve` with speculative decoding: the `kvscope` extension of a reply (plain and
streamed) carries the request's draft stats and the acceptance detector's verdict, and /metrics
the speculative counters, on a tiny glm4_moe checkpoint with an MTP layer."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from app.serve.protocol import Limits
from app.serve.server import ServeOptions, create_app
from runtime.engine import Engine, EngineConfig
from runtime.integrity.config import IntegrityConfig
from tests.app.serve_helpers import write_glm_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_glm_checkpoint(tmp_path_factory.mktemp("glm_serve_mtp"), mtp=1)


def _client(ckpt, speculative, **accept):
    cfg = EngineConfig(
        device="cpu",
        page_size=4,
        max_running=4,
        cpu_graph="off",
        speculative=speculative,
        integrity=IntegrityConfig(**accept),
    )
    opts = ServeOptions(model_name="glm-test", limits=Limits(max_body_bytes=4096, max_tokens=64))
    return TestClient(create_app(Engine(ckpt, cfg), opts))


def _metrics(c) -> dict[str, float]:
    time.sleep(0.3)  # the runner publishes a snapshot every 0.25 s
    out = {}
    for ln in c.get("/metrics").text.splitlines():
        if ln.startswith("kvscope_speculative_"):
            name, value = ln.split()
            out[name[len("kvscope_speculative_") :]] = float(value)
    return out


BODY = {"model": "glm-test", "prompt": "the cat sat on", "max_tokens": 10, "temperature": 0}


def test_extension_and_metrics_with_drafts(ckpt):
    with _client(ckpt, 2) as c:
        sums = {"steps": 0, "drafted": 0, "accepted": 0}
        for prompt in ("the cat sat on", "a dog ran"):
            r = c.post("/v1/completions", json={**BODY, "prompt": prompt}).json()
            s = r["kvscope"]["speculation"]
            assert s["steps"] >= 1 and s["steps"] <= s["drafted"] <= 2 * s["steps"]
            assert s["accept_length"] == pytest.approx(
                (s["accepted"] + s["steps"]) / s["steps"], 1e-3
            )
            assert r["kvscope"]["acceptance"] is None  # default: judged after 128 tokens
            for k in sums:
                sums[k] += s[k]
        m = _metrics(c)
        assert m["draft_tokens"] == 2
        assert m["steps_total"] == sums["steps"]
        assert m["drafted_tokens_total"] == sums["drafted"]
        assert m["accepted_tokens_total"] == sums["accepted"]
        assert m["accept_length"] == pytest.approx(
            (sums["accepted"] + sums["steps"]) / sums["steps"]
        )
        assert m["acceptance_detections_total"] == 0


def test_acceptance_detection_in_reply_stream_and_metrics(ckpt):
    # an accept length is at most 3 with 2 drafts: a minimum of 5 flags every judged token
    with _client(ckpt, 2, accept_min_length=5.0, accept_after_tokens=4) as c:
        r = c.post("/v1/completions", json=BODY).json()
        a = r["kvscope"]["acceptance"]
        assert a["first_token"] == 3 and a["flagged_tokens"] == 10 - 3
        assert "accept length" in a["final"] and "< 5" in a["final"]
        assert r["kvscope"]["verdict"] == "suspect"
        with c.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as resp:
            chunks = [
                json.loads(ln[6:])
                for ln in resp.iter_lines()
                if ln.startswith("data: ") and ln != "data: [DONE]"
            ]
        ext = [ch["kvscope"] for ch in chunks if "kvscope" in ch]
        assert len(ext) == 1 and ext[0]["speculation"]["steps"] >= 1
        assert ext[0]["acceptance"]["flagged_tokens"] == 7
        m = _metrics(c)
        assert m["acceptance_detections_total"] == 2


def test_without_drafts(ckpt):
    with _client(ckpt, 0) as c:
        r = c.post("/v1/completions", json=BODY).json()
        assert r["kvscope"]["speculation"] is None and r["kvscope"]["acceptance"] is None
        m = _metrics(c)
        assert m["draft_tokens"] == 0 and m["drafted_tokens_total"] == 0
