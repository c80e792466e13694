"""Inspector screen: the live cache, page by page, tier by tier, token by token."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static, TabbedContent, TabPane

from inspector.format import TIER_COLORS
from inspector.messages import SlotSelected
from inspector.widgets.chart import PlotextChart
from inspector.widgets.experts import ExpertHeat
from inspector.widgets.page_map import PageMap, legend
from inspector.widgets.radix import RadixView
from inspector.widgets.slot_detail import SlotDetail
from inspector.widgets.tables import IntegrityLog, RequestsTable
from inspector.widgets.tier_bars import TierBars
from runtime.telemetry import TIERS, EngineSnapshot

if TYPE_CHECKING:
    from inspector.app import KvscopeApp

TABS = ("cache", "charts", "requests", "integrity", "experts")


class InspectScreen(Screen[None]):
    BINDINGS = [
        Binding("p", "app.toggle_pause", "Pause/run"),
        Binding("full_stop", "app.step_once", "Step"),
        *(Binding(str(i + 1), f"show_tab('{t}')", t, show=False) for i, t in enumerate(TABS)),
    ]

    @property
    def kv_app(self) -> KvscopeApp:
        return cast("KvscopeApp", self.app)

    def compose(self) -> ComposeResult:
        yield Static(id="inspect-title", classes="title")
        with TabbedContent(id="tabs"):
            with TabPane("1 Cache", id="cache"), Container(id="cache-body"):
                with Vertical(id="cache-left"):
                    yield TierBars(id="tiers")
                    yield PageMap(id="pagemap")
                    yield Static(legend(), id="pagemap-legend")
                    yield SlotDetail(id="slot-detail")
                with Vertical(id="cache-right"):
                    yield PlotextChart("L1/L2/L3 occupancy %", ylim=(0, 100), id="occ-mini")
                    yield RadixView(id="radix-mini")
            with TabPane("2 Charts", id="charts"), Container(id="charts-grid"):
                yield PlotextChart("tier occupancy %", ylim=(0, 100), id="occ-chart")
                yield PlotextChart("throughput tok/s", id="tps-chart")
                yield PlotextChart(
                    "time to first token (s) per request", id="ttft-chart", ylim=(0, None)
                )
            with TabPane("3 Requests", id="requests"):
                yield RequestsTable(id="requests-table")
                yield RadixView(limit=8, id="radix")
            with TabPane("4 Integrity", id="integrity"):
                yield IntegrityLog(id="integrity-log")
            with TabPane("5 Experts", id="experts"), VerticalScroll():
                yield ExpertHeat(id="expert-heat")
        yield Footer()

    def on_mount(self) -> None:
        self.kv_app.snapshot_signal.subscribe(self, self._on_snapshot)
        self.query_one("#slot-detail").border_title = "slot"
        self.query_one("#pagemap").border_title = "L1 page map"
        self._on_snapshot(self.kv_app.snapshot)
        self.query_one(PageMap).focus()

    def on_screen_resume(self) -> None:
        self._on_snapshot(self.kv_app.snapshot)

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab

    # ------------------------------------------------------------ updates
    def _on_snapshot(self, snap: EngineSnapshot | None) -> None:
        if snap is None or not self.is_current:
            return
        app = self.kv_app
        active = sum(r.status in ("waiting", "prefill", "decode") for r in snap.requests)
        title = Text.from_markup(f"[b]kvscope[/b] inspector │ t {snap.time_s:.2f} s │ ")
        title.append(*(("PAUSED", "black on yellow") if app.paused else ("running", "green")))
        title.append(f" │ {active}/{len(snap.requests)} req │ {snap.tokens_generated} tok │ ")
        title.append(f"{snap.decode_tok_per_s:.1f} tok/s │ {snap.model}")
        self.query_one("#inspect-title", Static).update(title)
        self.query_one(TierBars).show(snap)
        page_map = self.query_one(PageMap)
        page_map.set_pages(snap.pages)
        self._show_slot(page_map.cursor)
        self.query_one("#radix-mini", RadixView).show(snap.radix)
        self.query_one("#radix", RadixView).show(snap.radix)
        self.query_one(RequestsTable).show(snap.requests)
        self.query_one(IntegrityLog).show(snap.integrity_events)
        self.query_one(ExpertHeat).show(snap.expert_heat, snap.layer_owners)
        self._plot()

    def _plot(self) -> None:
        h = self.kv_app.history
        t = list(h.time)
        occupancy = [(tier, t, list(h.tier_pct[tier]), TIER_COLORS[tier]) for tier in TIERS]
        self.query_one("#occ-mini", PlotextChart).plot(occupancy)
        self.query_one("#occ-chart", PlotextChart).plot(occupancy)
        self.query_one("#tps-chart", PlotextChart).plot(
            [
                ("decode", t, list(h.decode_tps), "green"),
                ("prefill", t, list(h.prefill_tps), "cyan"),
            ]
        )
        ttft = list(h.ttft.values())
        self.query_one("#ttft-chart", PlotextChart).plot(
            [("TTFT", [x for x, _ in ttft], [y for _, y in ttft], "yellow")]
        )

    @on(SlotSelected)
    def _on_slot(self, event: SlotSelected) -> None:
        self._show_slot(event.slot)

    def _show_slot(self, slot: int) -> None:
        snap = self.kv_app.snapshot
        page_map = self.query_one(PageMap)
        page = snap.pages[slot] if snap is not None and 0 <= slot < len(snap.pages) else None
        self.query_one(SlotDetail).show(page, snap.page_size if snap else 0, page_map.owner_colors)
