"""Pilot tests of the Textual app on the FakeEngine."""

from __future__ import annotations

from textual.widgets import DataTable, Input, TabbedContent

from inspector.app import KvscopeApp
from inspector.screens.chat import ChatScreen
from inspector.screens.inspect import TABS, InspectScreen
from inspector.screens.model_info import ModelInfoScreen
from inspector.widgets.page_map import PageMap
from inspector.widgets.reply import ReplyView
from inspector.widgets.status_line import StatusLine
from inspector.widgets.tier_bars import TierBars
from inspector.widgets.token_detail import TokenDetail
from runtime.telemetry import RequestInfo
from tests.inspector.fake_engine import FakeEngine


def quiet(app: KvscopeApp) -> KvscopeApp:
    app.animation_level = "none"  # no tab-underline animations to wait for
    return app


def request(app: KvscopeApp, request_id: str) -> RequestInfo:
    """The request as the app's latest snapshot shows it (a dummy until it appears)."""
    found = [r for r in app.snapshot.requests if r.request_id == request_id]
    return found[0] if found else RequestInfo(request_id, "unseen", 0, 0, {}, 0, None, None, "ok")


def l1_used(app: KvscopeApp) -> int:
    return next(t.pages_used for t in app.snapshot.tiers if t.tier == "L1")


async def test_prompt_has_focus_when_the_app_opens():
    app = quiet(KvscopeApp(FakeEngine()))
    async with app.run_test(size=(80, 24)) as pilot:
        assert isinstance(app.screen, ChatScreen)
        assert app.focused is app.screen.query_one("#prompt", Input)
        await pilot.press("f2")
        assert isinstance(app.screen, InspectScreen)
        await pilot.press("f1")
        assert app.focused is app.screen.query_one("#prompt", Input)


async def test_inspect_start_screen_then_chat_focuses_the_prompt():
    app = quiet(KvscopeApp(FakeEngine(), start_screen="inspect"))
    async with app.run_test(size=(80, 24)) as pilot:
        assert isinstance(app.screen, InspectScreen)
        await pilot.press("f1")
        assert app.focused is app.screen.query_one("#prompt", Input)


async def test_typed_prompt_streams_tokens_into_the_transcript(send, wait_for):
    engine = FakeEngine(seed=1)
    app = quiet(KvscopeApp(engine))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press(*"hello cache", "enter")
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None)
        reply = app.session.reply("chat-1")
        assert reply is not None and reply.finish_reason == "length"
        assert app.steps_seen >= len(reply.tokens) > 1  # tokens arrived step by step
        view = app.screen.query_one(ReplyView)
        await wait_for(pilot, lambda: reply.text in view.render().plain)
        # the status line reports the request from the engine's snapshot
        await wait_for(pilot, lambda: request(app, "chat-1").status == "finished")
        await pilot.pause()
        status = str(app.screen.query_one(StatusLine).render())
        assert "chat-1" in status and "50.0 tok/s" in status and "TTFT 20 ms" in status
        # the whole conversation is resent: the second turn hits the cached prefix in L1
        await send(pilot, "and again")
        await wait_for(pilot, lambda: app.session.reply("chat-2") and app.session.active is None)
        await wait_for(pilot, lambda: request(app, "chat-2").status == "finished")
        assert request(app, "chat-2").cached_tokens["L1"] > 0


async def test_tokens_appear_while_generating_and_stop_aborts(send, wait_for, manual_steps):
    app = quiet(KvscopeApp(FakeEngine(seed=3), paused=True))
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "stream please")
        await wait_for(pilot, lambda: app.session.active is not None)
        await pilot.press("f2")
        await manual_steps(pilot, 3)  # prefill + 2 decode steps
        await pilot.press("f1")
        view = app.screen.query_one(ReplyView)
        assert len(view.reply.tokens) == 3 and not view.reply.finished
        assert view.reply.text in view.render().plain
        await pilot.press("escape")
        await wait_for(pilot, lambda: view.reply.finished)
        assert view.reply.finish_reason == "abort" and "[stopped]" in view.render().plain

        def statuses() -> dict[str, str]:
            return {r.request_id: r.status for r in app.engine.snapshot().requests}

        await wait_for(pilot, lambda: statuses() == {"chat-1": "aborted"})
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: not app.screen.query(ReplyView))
        assert not app.session.turns and app.focused is app.screen.query_one("#prompt")


async def test_selecting_a_token_shows_its_verdict(send, wait_for):
    app = quiet(KvscopeApp(FakeEngine(seed=0)))
    async with app.run_test(size=(120, 30)) as pilot:
        await send(pilot, "hello there cache")
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None)
        reply = app.session.reply("chat-1")
        await pilot.press("tab")
        view = app.screen.query_one(ReplyView)
        assert app.focused is view and view.cursor == len(reply.tokens) - 1
        await pilot.press("left")
        detail = str(app.screen.query_one(TokenDetail).render())
        assert f"token {len(reply.tokens) - 2} of chat-1" in detail and "pages read" in detail
        await pilot.click(ReplyView, offset=(2, 0))  # border + padding, then the first token
        assert view.cursor == 0
        detail = str(app.screen.query_one(TokenDetail).render())
        assert "token 0 of chat-1" in detail and reply.tokens[0].text.strip() in detail


async def test_inspector_follows_a_second_request(send, wait_for, manual_steps):
    engine = FakeEngine(seed=2)
    app = quiet(KvscopeApp(engine))
    async with app.run_test(size=(100, 32)) as pilot:
        await send(pilot, "first question")
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None)
        await pilot.press("f2", "p")
        assert isinstance(app.screen, InspectScreen) and app.paused
        await wait_for(pilot, lambda: not engine.has_work())
        seen = app.steps_seen
        await pilot.press("full_stop")  # "." steps once while paused
        await wait_for(pilot, lambda: app.steps_seen == seen + 1)
        screen = app.screen
        page_map, bars = screen.query_one(PageMap), screen.query_one(TierBars)
        pages_before, l1_before = page_map.pages, l1_used(app)
        bars_before = str(bars.render())
        # a second request arrives from the chat, the engine is stepped by hand
        await pilot.press("f1")
        await send(pilot, "second question")
        await pilot.press("f2")
        await wait_for(pilot, lambda: app.session.active is not None)
        await manual_steps(pilot, 2)
        owned = [p for p in page_map.pages if "chat-2" in p.owners]
        assert owned and page_map.pages != pages_before
        assert l1_used(app) > l1_before and str(bars.render()) != bars_before
        # selecting a slot of the second request shows its owner and state
        slot = owned[-1].slot
        cols = page_map.columns
        await pilot.click(PageMap, offset=(1 + 2 * (slot % cols), 1 + slot // cols))  # in border
        assert page_map.cursor == slot
        slot_text = str(screen.query_one("#slot-detail").render())
        assert f"slot {owned[-1].slot}" in slot_text and "chat-2" in slot_text
        # the requests table lists it; resuming finishes it
        await pilot.press("3")
        table = screen.query_one("#requests-table", DataTable)
        assert [str(c) for c in table.get_row("chat-2")[:2]] == ["chat-2", "decode"]
        await pilot.press("p")
        await wait_for(pilot, lambda: app.session.active is None)
        await wait_for(pilot, lambda: not any("chat-2" in p.owners for p in page_map.pages))


async def test_every_screen_and_tab_renders_at_80x24(send, wait_for):
    engine = FakeEngine(seed=4, inject="epoch")
    app = quiet(KvscopeApp(engine))
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "fill the cache")
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None)
        await pilot.press("tab", "left")  # token detail panel opens at the narrow size
        assert app.screen.query_one(TokenDetail).region.height > 3
        assert app.screen.query_one("#prompt").region.height == 3
        await pilot.press("f3")
        assert isinstance(app.screen, ModelInfoScreen)
        await pilot.pause()
        assert "fake-moe" in app.export_screenshot() and "L3&#160;pool" in app.export_screenshot()
        await pilot.press("escape", "f2")
        screen = app.screen
        assert screen.query_one(PageMap).region.height >= 3
        assert screen.query_one("#slot-detail").region.bottom <= 23
        for key, tab in zip("12345", TABS, strict=True):
            await pilot.press(key)
            await pilot.pause()
            assert screen.query_one(TabbedContent).active == tab
        table = screen.query_one("#integrity-table", DataTable)
        kinds = {str(table.get_row_at(i)[2]) for i in range(table.row_count)}
        assert {"inject", "epoch", "recovery"} <= kinds


async def test_failures_are_shown_not_raised(send, wait_for):
    class BrokenEngine(FakeEngine):
        def step(self):
            raise RuntimeError("device lost")

    app = quiet(KvscopeApp(FakeEngine(l1_pages=2)))
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "word " * 40)  # needs more pages than the pool has
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None)
        assert "pages" in app.session.reply("chat-1").error
        assert "error:" in app.screen.query_one(ReplyView).render().plain

    app = quiet(KvscopeApp(BrokenEngine()))
    async with app.run_test(size=(80, 24)) as pilot:
        await send(pilot, "hi")
        await wait_for(pilot, lambda: app.paused)
        await wait_for(pilot, lambda: app._notifications)
        assert "device lost" in str(list(app._notifications)[-1].message)
