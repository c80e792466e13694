"""Model info: a modal with what the engine says about the loaded model and its cache."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from inspector.format import human_bytes
from runtime.telemetry import EngineSnapshot


def info_table(info: dict[str, str], snap: EngineSnapshot | None) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = dict(info)
    if snap is not None:
        seen = {k.replace("_", " ") for k in rows}
        if "device" not in seen:
            rows["device"] = snap.device
        if "page size" not in seen:
            rows["page size"] = f"{snap.page_size} tokens"
        for t in snap.tiers:
            rows[f"{t.tier} pool"] = f"{t.pages_total} pages, {human_bytes(t.bytes_total)}"
        rows.update(snap.extra)
    for key, value in rows.items():
        table.add_row(key.replace("_", " "), value)
    return table


class ModelInfoScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,enter,q,f3", "dismiss", "Close")]

    def __init__(self, info: dict[str, str], snap: EngineSnapshot | None) -> None:
        super().__init__()
        self.info, self.snap = info, snap

    def compose(self) -> ComposeResult:
        with Vertical(id="model-info"):
            yield Static(info_table(self.info, self.snap))

    def on_mount(self) -> None:
        box = self.query_one("#model-info")
        box.border_title, box.border_subtitle = "model", "Esc closes"

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
