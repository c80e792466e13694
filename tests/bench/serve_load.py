"""Load test of `kvscope serve` on the demo model (bounded, loopback only).

    .venv/bin/python tests/bench/serve_load.py [--clients 32] [--requests 500] [--max-tokens 16]

A real uvicorn server on 127.0.0.1:<ephemeral port> runs in this process (so the page
invariants can be checked afterwards) with L2 and L3 on. Phase 1 asks every distinct prompt
alone (greedy) for its isolated reply. Phase 2: `clients` concurrent clients send `requests`
requests (a shared system prompt + one of the questions), half streamed, half not; a quarter of
them are streams the client drops after a random number of chunks. Checks: every completed
reply equals its prompt's isolated reply; afterwards every L1 page is FREE or CACHED with
refcount == owners == 0 and the scheduler's invariants hold; prefix hits are counted. Prints a
JSON summary (requests/s, TTFT p50/p99, tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

SYSTEM = (
    "You are a careful assistant for a small library of Python code. Answer in one short "
    "sentence, name the function you mean, and never invent modules that do not exist."
)
QUESTIONS = [
    "How do I read a file?",
    "What does a decorator do?",
    "How do I sort a list of tuples?",
    "Explain a generator.",
    "How do I parse JSON?",
    "What is a context manager?",
    "How do I join paths?",
    "What does zip return?",
    "How do I copy a dictionary?",
    "What is a lambda?",
    "How do I reverse a string?",
    "What is recursion?",
    "How do I time a function?",
    "What does enumerate do?",
    "How do I merge two lists?",
    "What is a class method?",
]


def _body(q: str, max_tokens: int, stream: bool) -> dict:
    return {
        "model": "demo",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


async def _one(client, url, q, max_tokens, mode, rng, stats, lengths):
    """mode: 'plain' | 'stream' | 'drop' (a stream the client abandons mid-way)."""
    t0 = time.perf_counter()
    while True:  # 429: back off and retry (counted)
        if mode == "plain":
            r = await client.post(url, json=_body(q, max_tokens, False))
            if r.status_code == 429:
                stats["429"] += 1
                await asyncio.sleep(0.05)
                continue
            r.raise_for_status()
            d = r.json()
            stats["latency"].append(time.perf_counter() - t0)
            stats["tokens"] += d["usage"]["completion_tokens"]
            stats["cached"] += d["usage"]["prompt_tokens_details"]["cached_tokens"]
            return q, d["choices"][0]["message"]["content"] or ""
        async with client.stream("POST", url, json=_body(q, max_tokens, True)) as r:
            if r.status_code == 429:
                stats["429"] += 1
                await r.aread()
                await asyncio.sleep(0.05)
                continue
            r.raise_for_status()
            # drop strictly inside the reply: before its last content chunk
            cut = rng.randint(1, max(1, lengths[q] - 1)) if mode == "drop" else None
            parts, n, first = [], 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                c = json.loads(line[6:])
                if "error" in c:
                    raise RuntimeError(c["error"]["message"])
                if c.get("usage"):
                    stats["tokens"] += c["usage"]["completion_tokens"]
                    stats["cached"] += c["usage"]["prompt_tokens_details"]["cached_tokens"]
                if c["choices"] and "content" in c["choices"][0]["delta"]:
                    first = first or time.perf_counter()
                    parts.append(c["choices"][0]["delta"]["content"])
                    n += 1
                    if cut is not None and n >= cut:
                        stats["dropped"] += 1
                        return q, None  # leaving the block closes the connection mid-stream
            if first is not None:
                stats["ttft"].append(first - t0)
            return q, "".join(parts).strip()


async def _load(url, clients, total, max_tokens, seed, lengths):
    rng = random.Random(seed)
    plan = []
    for i in range(total):
        mode = "drop" if i % 4 == 0 else ("stream" if i % 2 else "plain")
        plan.append((rng.choice(QUESTIONS), mode))
    rng.shuffle(plan)
    stats = {"429": 0, "dropped": 0, "tokens": 0, "cached": 0, "ttft": [], "latency": []}
    results = []
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker(k):
            wrng = random.Random(seed * 1000 + k)
            while not queue.empty():
                q, mode = queue.get_nowait()
                results.append(await _one(client, url, q, max_tokens, mode, wrng, stats, lengths))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    return results, stats, wall


async def _isolated(url, max_tokens):
    """Each question alone: its reply text and its number of streamed content chunks."""
    ref, lengths = {}, {}
    async with httpx.AsyncClient(timeout=120) as client:
        for q in QUESTIONS:
            r = await client.post(url, json=_body(q, max_tokens, False))
            r.raise_for_status()
            ref[q] = r.json()["choices"][0]["message"]["content"] or ""
            chunks = []
            async with client.stream("POST", url, json=_body(q, max_tokens, True)) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: {"):
                        c = json.loads(line[6:])
                        if c["choices"] and "content" in c["choices"][0]["delta"]:
                            chunks.append(c)
            lengths[q] = len(chunks)
    return ref, lengths


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


def run_load(clients=32, requests=500, max_tokens=16, seed=0, max_running=16) -> dict:
    from app.serve.server import ServeOptions, create_app
    from runtime.engine import Engine, EngineConfig
    from tests.app.serve_helpers import UvicornThread, quiescent_pages

    disk = tempfile.mkdtemp(prefix="kvscope-load-l3-")
    cfg = EngineConfig(
        device="cpu",
        page_size=8,
        max_running=max_running,
        kv_host_mem=64 << 20,
        kv_disk=disk,
        kv_disk_size=256 << 20,
        cpu_graph="off",  # eager: isolated and batched replies take the same code path
    )
    engine = Engine(ROOT / "assets" / "demo", cfg)
    app = create_app(engine, ServeOptions(model_name="demo", max_waiting=clients))
    runner = app.state.runner
    with UvicornThread(app) as srv:
        url = srv.url + "/v1/chat/completions"
        ref, lengths = asyncio.run(_isolated(url, max_tokens))
        hits0 = dict(engine.kv.tree.hits)
        results, stats, wall = asyncio.run(_load(url, clients, requests, max_tokens, seed, lengths))
        deadline = time.monotonic() + 60
        while runner.in_flight or engine.has_work():
            assert time.monotonic() < deadline, "server did not go idle"
            time.sleep(0.05)
        completed = [(q, text) for q, text in results if text is not None]
        mismatches = [q for q, text in completed if text != ref[q]]
        quiescent_pages(engine)  # raises if a page leaked or a refcount is off
        hits = {t: engine.kv.tree.hits.get(t, 0) - hits0.get(t, 0) for t in ("L1", "L2", "L3")}
        reasons = dict(runner.finish_reasons)
    return {
        "clients": clients,
        "requests": requests,
        "completed": len(completed),
        "dropped_mid_stream": stats["dropped"],
        "engine_aborts": reasons.get("abort", 0),
        "retried_429": stats["429"],
        "greedy_mismatches": len(mismatches),
        "prefix_hits_pages": hits,
        "cached_prompt_tokens": stats["cached"],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 2),
        "completion_tokens_per_s": round(stats["tokens"] / wall, 1),
        "ttft_p50_s": round(_pct(stats["ttft"], 50), 4),
        "ttft_p99_s": round(_pct(stats["ttft"], 99), 4),
        "latency_p50_s": round(statistics.median(stats["latency"]), 4),
        "max_tokens": max_tokens,
        "max_running": max_running,
        "page_size": 8,
        "cpu_threads": os.cpu_count(),
        "torch_threads": __import__("torch").get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="kvscope-xdg-"))
    out = run_load(a.clients, a.requests, a.max_tokens, a.seed, a.max_running)
    print(json.dumps(out, indent=2))
    raise SystemExit(1 if out["greedy_mismatches"] else 0)


if __name__ == "__main__":
    main()
