"""Small formatting helpers shared by widgets (pure functions, no Textual)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

from runtime.telemetry import TokenVerdict

VERDICT_STYLE = {"ok": "green", "suspect": "black on yellow", "corrupt": "bold white on red"}
VERDICT_MARK = {"ok": "✓", "suspect": "?", "corrupt": "✗"}
# Integrity log kinds that are not KV violations (anything else is a violation: red). The
# speculative acceptance detector (runtime/integrity/acceptance.py) judges a whole request's
# drafts, not a page read: its own colour, also on the tokens it alone made suspect.
EVENT_STYLE = {"inject": "magenta", "recovery": "green", "acceptance": "dark_orange"}
ACCEPTANCE_PREFIX = "acceptance: "  # the detector's token-verdict reasons
ACCEPTANCE_STYLE = "black on dark_orange"
# Speculative decoding (TokenVerdict.draft): the colour stays the verdict's; the draft status is
# the text style, so both read at once.
DRAFT_STYLE = {"accepted": "underline", "rejected": "italic"}
DRAFT_LEGEND = (
    ("accepted", "underlined: MTP draft the target accepted"),
    ("rejected", "italic: the target's token after it rejected drafts"),
)
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


def draft_status(v: TokenVerdict) -> str:
    """ "" (no speculation, or the target's token after every draft was accepted), "accepted"
    (an MTP draft the target accepted) or "rejected" (the target's own token replacing
    `v.rejected` rejected drafts)."""
    if v.draft == "accepted":
        return "accepted"
    return "rejected" if v.draft == "target" and v.rejected > 0 else ""


def acceptance_only(v: TokenVerdict) -> bool:
    """Suspect only because of the speculative acceptance detector."""
    return (
        v.verdict == "suspect"
        and bool(v.reasons)
        and all(r.startswith(ACCEPTANCE_PREFIX) for r in v.reasons)
    )


def token_style(v: TokenVerdict) -> Style:
    """A streamed token's style: its verdict as colour, its draft status as text style."""
    colour = ACCEPTANCE_STYLE if acceptance_only(v) else VERDICT_STYLE.get(v.verdict, "")
    style = Style.parse(colour)
    status = draft_status(v)
    return style + Style.parse(DRAFT_STYLE[status]) if status else style


def fmt_accept(length: float | None, rate: float | None) -> tuple[str, str]:
    """Accept length and rate cells ("–" without speculation)."""
    if length is None:
        return "–", "–"
    return f"{length:.2f}", "–" if rate is None else f"{rate:.0%}"
