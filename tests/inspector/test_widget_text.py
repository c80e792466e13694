"""The pure render helpers behind the widgets (no app needed)."""

from __future__ import annotations

from rich.text import Text

from inspector.format import bar, human_bytes, ranges
from inspector.widgets.chart import build_chart
from inspector.widgets.experts import heat_text, split_text
from inspector.widgets.page_map import SHARED, STATE_GLYPHS, PageMap
from inspector.widgets.radix import radix_text
from inspector.widgets.slot_detail import describe_slot
from inspector.widgets.status_line import status_text
from inspector.widgets.tables import event_counts
from inspector.widgets.tier_bars import tier_lines
from inspector.widgets.token_detail import describe_token
from runtime.telemetry import IntegrityEvent, PageInfo, TokenEvent, TokenVerdict
from tests.inspector.fake_engine import FakeEngine


def test_format_helpers():
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024**3) == "3.0 GiB"
    assert ranges((0, 1, 2, 5, 7, 8)) == "0-2, 5, 7-8"
    assert bar(0.5, 8).plain == "████····" and bar(2.0, 4).plain == "████"
    assert bar(0.25, 2).plain == "▌·" and bar(1 / 16, 2).plain == "▏·"


def test_page_cells_by_state_and_owner():
    pm = PageMap()
    pages = (
        PageInfo(0, "READY", ("a",), 0, 16, "x", ("L1",)),
        PageInfo(1, "READY", ("a", "b"), 0, 16, "x", ("L1",)),
        PageInfo(2, "CACHED", (), 3, 16, "x", ("L1", "L2")),
        PageInfo(3, "WRITING", ("b",), 0, 3, None, ("L1",)),
        PageInfo(4, "DRAINING", (), 1, 3, None, ("L1",)),
        PageInfo(5, "FREE", (), 2, 0, None, ()),
    )
    pm.set_pages(pages)
    cells = [pm.cell(p) for p in pages]
    assert cells[0] == ("■", pm.owner_colors["a"]) and cells[1] == SHARED
    assert cells[2:] == [STATE_GLYPHS[s] for s in ("CACHED", "WRITING", "DRAINING", "FREE")]
    assert pm.owner_colors["a"] != pm.owner_colors["b"]
    text = describe_slot(pages[1], 16).plain
    assert "shared, refcount 2" in text and "READY" in text and "copies L1" in text
    assert "not written yet" in describe_slot(pages[5], 16).plain


def test_snapshot_texts():
    engine = FakeEngine(seed=0)
    engine.submit("hello " * 30, request_id="a", max_new_tokens=5)
    while engine.has_work():
        engine.step()
    snap = engine.snapshot()
    tiers = tier_lines(snap, 80).plain.splitlines()
    assert tiers[0].startswith("L1 device") and "/96 pages" in tiers[0]
    assert all(len(line) <= 80 for line in tiers)
    assert "longest cached prefixes" in radix_text(snap.radix).plain
    heat = heat_text(snap.expert_heat, snap.layer_owners, 60).plain
    assert "4 layers x 16 experts" in heat and "L3 r1" in heat
    assert "off" in heat_text((), (), 60).plain and "off" in split_text((), 0).plain
    assert "rank 1 ··██ layers 2-3 (2)" in split_text(snap.layer_owners, 4).plain


def test_chart_size_comes_from_the_widget_not_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")
    monkeypatch.setenv("LINES", "5")
    chart = build_chart([("L1", [0, 1, 2], [0, 50, 25], "green")], 90, 12, (0, None))
    lines = Text.from_ansi(chart).plain.splitlines()
    assert len(lines) == 12 and max(map(len, lines)) == 90


def test_event_counts_and_token_details():
    events = (
        IntegrityEvent(0.1, "a", "inject", "x", (1,)),
        IntegrityEvent(0.1, "a", "checksum", "y", (1,)),
        IntegrityEvent(0.2, "a", "recovery", "z", (1,)),
    )
    assert event_counts(events).plain.startswith("violations 1 · injected 1 · recoveries 1")
    verdict = TokenVerdict("corrupt", ("epoch mismatch on page 3",), (1, 3), False, True, 2,
                           (False, 3.25))  # fmt: skip
    text = describe_token(TokenEvent("a", 4, 77, " cache", verdict)).plain
    assert "token 4 of a" in text and "CORRUPT" in text and "epoch mismatch" in text
    assert "pages read 2: 1 3" in text and "epochs ✗ FAILED" in text
    assert "top-1 DIFFERS, max |Δlogit| 3.250" in text


def test_status_text_idle_and_paused():
    snap = FakeEngine().snapshot()
    assert status_text(snap, None, paused=False).plain == "idle │ L1 0/96 pages"
    assert status_text(None, None, paused=True).plain.startswith(" PAUSED ")
