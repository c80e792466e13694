"""Expert cache heat (layer x expert hits) and LayerSplit ownership (rank -> layers)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from inspector.format import OWNER_COLORS, ranges

HEAT = (
    "grey23",
    "navy_blue",
    "dodger_blue3",
    "dark_cyan",
    "green3",
    "yellow",
    "dark_orange",
    "red",
)


def heat_text(
    heat: tuple[tuple[int, ...], ...], owners: tuple[tuple[int, ...], ...], width: int
) -> Text:
    if not heat:
        return Text("expert offload is off: no expert cache to show", "dim")
    rank_of = {layer: r for r, layers in enumerate(owners) for layer in layers}
    experts = max(len(row) for row in heat)
    label_w = len(f"L{len(heat) - 1}") + (4 if owners else 1)
    room = max(1, width - label_w)
    per_col = max(1, -(-experts // room))  # experts folded into one cell
    cell = max(1, min(3, room // experts))  # columns per cell when there is room
    cells = [
        [sum(row[c * per_col : (c + 1) * per_col]) for c in range(-(-len(row) // per_col))]
        for row in heat
    ]
    peak = max((max(r) for r in cells if r), default=0) or 1
    out = Text()
    out.append(f"{len(heat)} layers x {experts} experts", "bold")
    out.append(f" · 1 cell = {per_col} expert(s) · peak {peak} hits · " if per_col > 1 else
               f" · peak {peak} hits · ")  # fmt: skip
    out.append("cold ")
    for color in HEAT:
        out.append("█", color)
    out.append(" hot")
    for layer, row in enumerate(cells):
        out.append("\n")
        out.append(f"L{layer}".ljust(len(f"L{len(heat) - 1}")) + " ")
        if owners:
            rank = rank_of.get(layer)
            style = OWNER_COLORS[rank % len(OWNER_COLORS)] if rank is not None else "dim"
            out.append(f"r{rank if rank is not None else '?'} ", style)
        for hits in row:
            level = 0 if not hits else 1 + min(len(HEAT) - 2, (len(HEAT) - 1) * hits // (peak + 1))
            out.append("█" * cell, HEAT[level])
    return out


def split_text(owners: tuple[tuple[int, ...], ...], layers: int) -> Text:
    if not owners:
        return Text("LayerSplit is off: one rank owns every layer", "dim")
    n = max(layers, 1 + max((max(o) for o in owners if o), default=-1))
    out = Text(f"LayerSplit over {len(owners)} ranks, {n} layers", "bold")
    for rank, owned in enumerate(owners):
        color = OWNER_COLORS[rank % len(OWNER_COLORS)]
        out.append(f"\nrank {rank} ", color)
        for layer in range(n):
            out.append("█" if layer in owned else "·", color if layer in owned else "grey35")
        out.append(f" layers {ranges(owned) or '–'} ({len(owned)})")
    return out


class ExpertHeat(Widget):
    DEFAULT_CSS = "ExpertHeat { height: auto; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.heat: tuple[tuple[int, ...], ...] = ()
        self.owners: tuple[tuple[int, ...], ...] = ()

    def show(self, heat: tuple[tuple[int, ...], ...], owners: tuple[tuple[int, ...], ...]) -> None:
        if (heat, owners) != (self.heat, self.owners):
            self.heat, self.owners = heat, owners
            self.refresh(layout=True)

    def render(self) -> Text:
        width = max(10, self.content_size.width)
        out = heat_text(self.heat, self.owners, width)
        out.append("\n\n").append(split_text(self.owners, len(self.heat)))
        return out
