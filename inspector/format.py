"""Small formatting helpers shared by widgets (pure functions, no Textual)."""

from __future__ import annotations

from rich.text import Text

VERDICT_STYLE = {"ok": "green", "suspect": "black on yellow", "corrupt": "bold white on red"}
VERDICT_MARK = {"ok": "✓", "suspect": "?", "corrupt": "✗"}
EVENT_STYLE = {"inject": "magenta", "recovery": "green"}  # anything else is a violation: red
OWNER_COLORS = ("dodger_blue1", "green3", "dark_orange", "orchid", "turquoise2", "gold1",
                "salmon1", "chartreuse3")  # fmt: skip
TIER_COLORS = {"L1": "green", "L2": "cyan", "L3": "blue"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f} tok/s"


def fmt_secs(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def bar(fraction: float, width: int, style: str = "green") -> Text:
    """A horizontal bar of `width` cells with eighth-block resolution."""
    width = max(1, width)
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = Text("█" * full, style=style)
    if part and full < width:
        text.append(" ▏▎▍▌▋▊▉"[part], style=style)
    text.append("·" * (width - len(text)), style="grey35")
    return text


def ranges(ids: tuple[int, ...] | list[int]) -> str:
    """`(0, 1, 2, 5, 7, 8)` -> `"0-2, 5, 7-8"`."""
    out: list[str] = []
    ids = sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)
