"""Radix tree summary: nodes, cached tokens, hits by tier, longest cached prefixes."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from inspector.format import TIER_COLORS
from runtime.telemetry import RadixSummary


def radix_text(radix: RadixSummary | None, limit: int = 5) -> Text:
    if radix is None:
        return Text("no radix data", "dim")
    out = Text()
    out.append(f"{radix.nodes} nodes · {radix.cached_tokens} cached tokens\nhits ")
    for tier, hits in sorted(radix.hits_by_tier.items()):
        out.append(f"{tier} ", TIER_COLORS.get(tier, "")).append(f"{hits}  ")
    if radix.longest_prefixes:
        out.append("\nlongest cached prefixes", "bold")
    for tokens, preview in radix.longest_prefixes[:limit]:
        out.append(f"\n{tokens:>6} tok  ").append(preview, "dim")
    out.no_wrap, out.overflow = True, "ellipsis"
    return out


class RadixView(Static):
    def __init__(self, *, limit: int = 5, id: str | None = None) -> None:
        super().__init__(id=id, classes="radix")
        self.limit = limit
        self._last: RadixSummary | None = None

    def on_mount(self) -> None:
        self.border_title = "radix tree"

    def show(self, radix: RadixSummary) -> None:
        if radix != self._last:
            self._last = radix
            self.update(radix_text(radix, self.limit))
