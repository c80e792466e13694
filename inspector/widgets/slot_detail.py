"""Details of the selected L1 page slot."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from runtime.telemetry import PageInfo


def describe_slot(
    page: PageInfo | None, page_size: int, owner_style: dict[str, str] | None = None
) -> Text:
    if page is None:
        return Text("no page selected", "dim")
    out = Text()
    out.append(f"slot {page.slot}", "bold").append(f"  {page.state}  epoch {page.epoch}")
    out.append(f"  {page.tokens}/{page_size} tokens\n")
    out.append("owners ")
    if not page.owners:
        out.append("none", "dim")
    for i, owner in enumerate(page.owners):
        out.append(", " if i else "").append(owner, (owner_style or {}).get(owner, "bold"))
    if len(page.owners) > 1:
        out.append(f"  (shared, refcount {len(page.owners)})", "magenta")
    out.append("\nchecksum ").append(page.checksum or "– (not written yet)")
    out.append("  copies ").append(" ".join(page.tiers) or "–")
    return out


class SlotDetail(Static):
    def show(self, page: PageInfo | None, page_size: int, owner_colors: dict[str, str]) -> None:
        self.update(describe_slot(page, page_size, owner_colors))
