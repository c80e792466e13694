"""SVG snapshot tests (pytest-textual-snapshot) at fixed sizes on the FakeEngine with fixed seeds.

Nothing on screen depends on the wall clock: the FakeEngine's clock is virtual, the inspector is
stepped by hand while paused (one chart point per step), and the chat waits for the reply to end.
Regenerate after an intended UI change with
`python -m pytest tests/inspector/test_tui_snapshots.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

from inspector.app import KvscopeApp
from inspector.widgets.page_map import PageMap
from tests.inspector.fake_engine import FakeEngine

PREFIX = "you are a careful assistant that explains paged attention caches " * 2


def app_requests(app: KvscopeApp) -> set[tuple[str, str]]:
    return {(r.request_id, r.status) for r in app.snapshot.requests}


def quiet(app: KvscopeApp) -> KvscopeApp:
    app.animation_level = "none"
    return app


def test_chat_with_a_selected_corrupt_token(snap_compare, send, wait_for):
    app = quiet(KvscopeApp(FakeEngine(seed=53)))  # its reply has suspect and corrupt tokens

    async def run_before(pilot):
        await send(pilot, "how does the cache keep tokens honest?")
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None)
        await wait_for(pilot, lambda: ("chat-1", "finished") in app_requests(app))
        await pilot.press("tab")  # the newest reply's last token: the corrupt one

    assert snap_compare(app, terminal_size=(110, 30), run_before=run_before)


def _inspector(seed: int = 7, **engine_options) -> tuple[KvscopeApp, FakeEngine]:
    engine = FakeEngine(seed=seed, l1_pages=24, l2_pages=12, **engine_options)
    engine.submit(PREFIX + "first question", request_id="alpha")
    return quiet(KvscopeApp(engine, start_screen="inspect", paused=True)), engine


async def _two_requests(pilot, engine: FakeEngine, manual_steps) -> None:
    await manual_steps(pilot, 3)
    engine.submit(PREFIX + "second question", request_id="beta")  # shares alpha's prefix pages
    await manual_steps(pilot, 4)


def test_inspector_cache_tab_two_requests_sharing_a_prefix(snap_compare, manual_steps):
    app, engine = _inspector()

    async def run_before(pilot):
        await _two_requests(pilot, engine, manual_steps)
        shared = next(p.slot for p in engine.snapshot().pages if len(p.owners) == 2)
        cols = app.screen.query_one(PageMap).columns
        await pilot.click(PageMap, offset=(1 + 2 * (shared % cols), 1 + shared // cols))

    assert snap_compare(app, terminal_size=(120, 34), run_before=run_before)


def test_inspector_charts_tab(snap_compare, manual_steps):
    app, engine = _inspector()

    async def run_before(pilot):
        await _two_requests(pilot, engine, manual_steps)
        await manual_steps(pilot, 8)
        await pilot.press("2")

    assert snap_compare(app, terminal_size=(120, 34), run_before=run_before)


def test_inspector_integrity_tab_with_injected_faults_at_80x24(snap_compare, manual_steps):
    app, engine = _inspector(seed=3, inject="fence")

    async def run_before(pilot):
        await _two_requests(pilot, engine, manual_steps)
        await manual_steps(pilot, 10)
        await pilot.press("4")

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_inspector_experts_tab_at_80x24(snap_compare, manual_steps):
    app, engine = _inspector()

    async def run_before(pilot):
        await _two_requests(pilot, engine, manual_steps)
        await pilot.press("5")

    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)
