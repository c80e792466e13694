"""Occupancy of the L1/L2/L3 tiers: pages and bytes, as bars sized to the widget."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from inspector.format import TIER_COLORS, bar, human_bytes
from runtime.telemetry import EngineSnapshot

_NAMES = {"L1": "device", "L2": "host", "L3": "disk"}


def tier_lines(snap: EngineSnapshot | None, width: int) -> Text:
    if snap is None:
        return Text("waiting for the engine…", "dim")
    out = Text()
    for usage in snap.tiers:
        pages = f"{usage.pages_used}/{usage.pages_total} pages"
        size = f"{human_bytes(usage.bytes_used)}/{human_bytes(usage.bytes_total)}"
        label = f"{usage.tier} {_NAMES.get(usage.tier, ''):<6} "
        tail = f" {pages:>15} {size:>19}"
        out.append(label, "bold")
        if not usage.pages_total:
            out.append("off (no pool configured)\n", "dim")
            continue
        frac = usage.pages_used / usage.pages_total
        out.append(bar(frac, width - len(label) - len(tail), TIER_COLORS.get(usage.tier, "white")))
        out.append(tail + "\n")
    out.append(
        f"in flight {snap.transfers_in_flight} · evictions {snap.evictions} · "
        f"drained {snap.drained_pages} · page {snap.page_size} tokens",
        "dim",
    )
    return out


class TierBars(Widget):
    DEFAULT_CSS = "TierBars { height: auto; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.snapshot: EngineSnapshot | None = None

    def show(self, snap: EngineSnapshot) -> None:
        if (
            self.snapshot is None
            or snap.tiers != self.snapshot.tiers
            or (
                snap.transfers_in_flight,
                snap.evictions,
                snap.drained_pages,
            )
            != (
                self.snapshot.transfers_in_flight,
                self.snapshot.evictions,
                self.snapshot.drained_pages,
            )
        ):
            self.snapshot = snap
            self.refresh(layout=True)

    def render(self) -> Text:
        return tier_lines(self.snapshot, max(10, self.content_size.width))
