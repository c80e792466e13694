"""Slow serve tests (KVSCOPE_SLOW=1 or `make test-slow`): the load test and the restart test.

The load test: 32 concurrent clients, 500 requests on the demo model, a quarter dropping their
stream mid-way (tests/bench/serve_load.py). The restart test: a second `kvscope serve` process
with the same --kv-disk serves a long system prompt's prefix from L3, with a lower TTFT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app.serve_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("KVSCOPE_SLOW"), reason="slow: set KVSCOPE_SLOW=1"),
]


def test_load_32_clients_500_requests_with_disconnects():
    sys.path.insert(0, str(ROOT / "tests" / "bench"))
    from serve_load import run_load

    out = run_load(clients=32, requests=500, max_tokens=16)
    assert out["greedy_mismatches"] == 0, out
    assert out["completed"] + out["dropped_mid_stream"] == 500
    assert out["dropped_mid_stream"] == 125, out  # every 4th request, before its last chunk
    assert out["engine_aborts"] >= 100, out  # the rest had finished when the drop arrived
    assert out["prefix_hits_pages"]["L1"] > 0 and out["cached_prompt_tokens"] > 0, out


LONG_SYSTEM = " ".join(
    f"Rule {i}: answer briefly, cite the function name, and keep the style consistent."
    for i in range(60)
)


def _serve(disk: Path, port: int, tmp: Path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "xdg"), KVSCOPE_CPU_GRAPH="0")
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--kv-disk", str(disk)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "server did not start"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def _warm_up(url: str) -> None:
    """One unrelated short request: the process's first-forward costs stay out of the TTFTs."""
    body = {"model": "demo", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    httpx.post(url + "/v1/completions", json=body, timeout=120).raise_for_status()


def _ask(url: str) -> tuple[float, dict, str]:
    _warm_up(url)
    body = {
        "model": "demo",
        "messages": [
            {"role": "system", "content": LONG_SYSTEM},
            {"role": "user", "content": "Which function reads a file?"},
        ],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, ext, parts = None, None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if c["choices"] and c["choices"][0]["delta"].get("content"):
                ttft = ttft or time.perf_counter() - t0
                parts.append(c["choices"][0]["delta"]["content"])
            ext = c.get("kvscope") or ext
    return ttft, ext, "".join(parts)


def _stop(proc) -> None:
    proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the engine lands L3 writes
    try:
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_restart_serves_the_long_prefix_from_l3(tmp_path):
    disk = tmp_path / "l3"
    proc, url = _serve(disk, free_port(), tmp_path)
    try:
        cold_ttft, cold, cold_text = _ask(url)
    finally:
        _stop(proc)
    assert cold["cached_tokens"]["L3"] == 0
    proc, url = _serve(disk, free_port(), tmp_path)
    try:
        warm_ttft, warm, warm_text = _ask(url)
    finally:
        _stop(proc)
    assert warm["cached_tokens"]["L3"] > 500, warm  # the long system prompt's pages
    assert warm_text == cold_text  # greedy, same prefix: the same reply
    print(f"restart: cold TTFT {cold_ttft:.3f}s {cold}, warm (L3) TTFT {warm_ttft:.3f}s {warm}")
    assert warm_ttft < cold_ttft, (warm_ttft, cold_ttft)
