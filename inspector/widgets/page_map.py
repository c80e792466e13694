"""PageMap: every L1 page slot as a cell, coloured by owner / shared / cached / free / in flight.

A ScrollView rendering only the visible rows, so pools of tens of thousands of pages stay cheap.
Cursor keys or a click select a slot (posted as `SlotSelected`).
"""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from inspector.format import OWNER_COLORS
from inspector.messages import SlotSelected
from runtime.telemetry import PageInfo

CELL = 2  # columns per slot: glyph + gap

STATE_GLYPHS = {
    "FREE": ("·", "grey42"),
    "WRITING": ("◐", "bold yellow"),
    "LOADING": ("◑", "bold cyan"),
    "DRAINING": ("✕", "bold red"),
    "CACHED": ("□", "steel_blue1"),
}
SHARED = ("◆", "bold magenta")


def legend() -> Text:
    text = Text()
    items = [("■", "dodger_blue1", "owner"), (*SHARED, "shared")]
    items += [(g, s, n) for n, (g, s) in STATE_GLYPHS.items() if n != "FREE"]
    items.append(("·", "grey42", "free"))
    names = {"WRITING": "writing", "LOADING": "loading", "DRAINING": "draining", "CACHED": "cached"}
    for glyph, style, name in items:
        text.append(glyph, style).append(f" {names.get(name, name)}  ")
    return text


class PageMap(ScrollView, can_focus=True):
    BINDINGS = [
        Binding("left", "move(-1, 0)", "Prev slot", show=False),
        Binding("right", "move(1, 0)", "Next slot", show=False),
        Binding("up", "move(0, -1)", "Slot above", show=False),
        Binding("down", "move(0, 1)", "Slot below", show=False),
        Binding("home", "jump(0)", "First slot", show=False),
        Binding("end", "jump(-1)", "Last slot", show=False),
    ]

    cursor: reactive[int] = reactive(0)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.pages: tuple[PageInfo, ...] = ()
        self._colors: dict[str, str] = {}

    # -------------------------------------------------------------- data
    def set_pages(self, pages: tuple[PageInfo, ...]) -> None:
        if pages == self.pages:
            return
        grew = len(pages) != len(self.pages)
        self.pages = pages
        for page in pages:
            for owner in page.owners:
                if owner not in self._colors:
                    self._colors[owner] = OWNER_COLORS[len(self._colors) % len(OWNER_COLORS)]
        if grew:
            self._resize_virtual()
            self.cursor = min(self.cursor, max(0, len(pages) - 1))
        self.refresh()

    @property
    def owner_colors(self) -> dict[str, str]:
        """Request id -> colour of its pages (stable for the life of the widget)."""
        return dict(self._colors)

    def cell(self, page: PageInfo) -> tuple[str, str]:
        if page.state in ("WRITING", "LOADING", "DRAINING", "FREE"):
            return STATE_GLYPHS[page.state]
        if len(page.owners) > 1:
            return SHARED
        if page.owners:
            return "■", self._colors.get(page.owners[0], "white")
        return STATE_GLYPHS["CACHED"]

    # ------------------------------------------------------------ layout
    @property
    def columns(self) -> int:
        return max(1, self.scrollable_content_region.width // CELL)

    def _resize_virtual(self) -> None:
        rows = -(-len(self.pages) // self.columns)
        self.virtual_size = Size(self.columns * CELL, rows)

    def on_resize(self, event: events.Resize) -> None:
        self._resize_virtual()

    def render_line(self, y: int) -> Strip:
        cols, width = self.columns, self.scrollable_content_region.width
        row = y + self.scroll_offset.y
        base = self.rich_style
        segments = []
        for slot in range(row * cols, min(len(self.pages), (row + 1) * cols)):
            glyph, style = self.cell(self.pages[slot])
            rich = base + Style.parse(style)
            if slot == self.cursor:
                rich += Style(reverse=True)
            segments += [Segment(glyph, rich), Segment(" ", base)]
        return Strip(segments).adjust_cell_length(width, base)

    # ------------------------------------------------------------ cursor
    def action_move(self, dx: int, dy: int) -> None:
        if self.pages:
            target = self.cursor + dx + dy * self.columns
            self.cursor = min(len(self.pages) - 1, max(0, target))

    def action_jump(self, slot: int) -> None:
        if self.pages:
            self.cursor = slot % len(self.pages)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        slot = (offset.y + self.scroll_offset.y) * self.columns + offset.x // CELL
        if offset.x < self.columns * CELL and slot < len(self.pages):
            self.cursor = slot
            self.focus()

    def watch_cursor(self, slot: int) -> None:
        cols = self.columns
        self.scroll_to_region(Region((slot % cols) * CELL, slot // cols, CELL, 1), animate=False)
        self.refresh()
        self.post_message(SlotSelected(slot))
