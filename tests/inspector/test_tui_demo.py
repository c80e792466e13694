"""The TUI on the real engine and the shipped demo model (not the FakeEngine).

The snapshot freezes only the wall-clock numbers (elapsed time, tok/s, TTFT), the checkout path
and the page checksums' digits through a thin wrapper; every page, tier, owner, epoch and token
comes from the real engine. Checksums are masked because KV bits depend on the CPU's GEMM path
(AVX-512 vs AMX vs AVX2 give last-bit differences); whether a page has one is still shown.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from inspector.app import KvscopeApp
from inspector.screens.inspect import InspectScreen
from inspector.widgets.page_map import PageMap
from runtime.engine import Engine, EngineConfig

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"


class FrozenClockEngine:
    """Delegates to a real Engine; snapshots report fixed timing figures."""

    def __init__(self, engine: Engine):
        self._e = engine

    def __getattr__(self, name):
        return getattr(self._e, name)

    def model_info(self) -> dict[str, str]:
        return {**self._e.model_info(), "model": "assets/demo"}  # independent of the checkout

    def snapshot(self):
        s = replace(self._e.snapshot(), model="assets/demo")
        reqs = tuple(replace(r, ttft_s=0.01, tok_per_s=100.0) for r in s.requests)
        pages = tuple(replace(p, checksum=p.checksum and "c" * len(p.checksum)) for p in s.pages)
        return replace(
            s,
            time_s=1.0,
            decode_tok_per_s=100.0,
            prefill_tok_per_s=1000.0,
            requests=reqs,
            pages=pages,
        )


def _engine() -> Engine:
    return Engine(DEMO, EngineConfig(device="cpu", page_size=16, kv_host_mem=1 << 22))


async def test_demo_chat_streams_then_inspector_follows_a_second_request(send, wait_for):
    engine = _engine()
    app = KvscopeApp(engine, max_new_tokens=16)
    app.animation_level = "none"
    async with app.run_test(size=(110, 34)) as pilot:
        await send(pilot, "What does the sort method do?")
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None, 60)
        reply = engine.request("chat-1")
        assert reply.output_ids and reply.text.strip()
        await pilot.press("f2")
        assert isinstance(app.screen, InspectScreen)
        await wait_for(pilot, lambda: app.snapshot is not None, 10)
        before = [p for p in app.screen.query_one(PageMap).pages if p.state != "FREE"]
        await pilot.press("f1")
        await send(pilot, "What does the sort method do with a key?")
        await pilot.press("f2")
        await wait_for(pilot, lambda: engine.request("chat-2").done, 60)
        await wait_for(
            pilot,
            lambda: any("chat-2" in r.request_id for r in app.snapshot.requests),
            10,
        )
        await pilot.pause(0.3)
        after = [p for p in app.screen.query_one(PageMap).pages if p.state != "FREE"]
        assert len(after) > len(before)  # the second request's pages appeared in the map
        # the second turn re-sends the first one: its prefix pages were reused from L1
        assert engine.request("chat-2").cached_tokens["L1"] > 0


@pytest.mark.parametrize("size", [(120, 34)])
def test_demo_inspector_snapshot(snap_compare, manual_steps, size):
    engine = _engine()
    engine.submit(prompt_ids=list(range(10, 60)), max_new_tokens=6, request_id="alpha", seed=0)
    app = KvscopeApp(FrozenClockEngine(engine), start_screen="inspect", paused=True)
    app.animation_level = "none"

    async def run_before(pilot):
        await manual_steps(pilot, 4)
        engine.submit(prompt_ids=list(range(10, 60)) + [7], max_new_tokens=4, request_id="beta")
        await manual_steps(pilot, 3)

    assert snap_compare(app, terminal_size=size, run_before=run_before)
