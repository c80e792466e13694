"""The selected token's integrity verdict, spelled out (and its speculative verify step)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from inspector.format import (
    ACCEPTANCE_PREFIX,
    ACCEPTANCE_STYLE,
    DRAFT_LEGEND,
    DRAFT_STYLE,
    VERDICT_STYLE,
    acceptance_only,
    draft_status,
)
from runtime.telemetry import TokenEvent

HINT = "Tab to a reply, then ←/→ (or click a token) to see its integrity verdict."


def _flag(ok: bool) -> Text:
    return Text("✓ ok", "green") if ok else Text("✗ FAILED", "bold red")


def describe_draft(ev: TokenEvent, step: tuple[int, int, int] | None) -> Text:
    """The speculative side of a token: what it was, and its verify step's counts."""
    v, out = ev.verdict, Text()
    status = draft_status(v)
    if v.draft == "accepted":
        out.append("MTP draft, accepted by the target", DRAFT_STYLE["accepted"])
    elif status == "rejected":
        out.append(f"target's own token ({v.rejected} draft(s) rejected)", DRAFT_STYLE["rejected"])
    else:
        out.append("target's own token (every draft accepted: bonus token)")
    if step is not None:
        drafted, accepted, rejected = step
        out.append(f"\n  verify step: drafted {drafted} · accepted {accepted} · ")
        out.append(f"rejected {rejected}", "yellow" if rejected else "")
    for key, text in DRAFT_LEGEND:
        out.append(f"\n  {text}", DRAFT_STYLE[key] + " dim")
    return out


def describe_token(ev: TokenEvent, step: tuple[int, int, int] | None = None) -> Text:
    """The verdict of a token; ``step``: its verify step's (drafted, accepted, rejected) when
    speculative decoding produced it (inspector/transcript.verify_step)."""
    v = ev.verdict
    out = Text()
    out.append(f"token {ev.index} of {ev.request_id}  ", "bold")
    out.append(repr(ev.text.strip() or ev.text))
    out.append(f"  id {ev.token_id}\n", "dim")
    out.append("verdict ")
    style = ACCEPTANCE_STYLE if acceptance_only(v) else VERDICT_STYLE.get(v.verdict, "")
    out.append(f" {v.verdict.upper()} ", style)
    out.append("\n")
    for reason in v.reasons:
        accept = reason.startswith(ACCEPTANCE_PREFIX)
        out.append(f"  • {reason}\n", "dark_orange" if accept else "yellow")
    pages = " ".join(map(str, v.pages[:24])) + (" …" if len(v.pages) > 24 else "")
    out.append(f"pages read {len(v.pages)}: {pages}\n")
    out.append("epochs ").append(_flag(v.epochs_ok)).append("  fences ").append(_flag(v.fences_ok))
    out.append(f"\nchecksums verified {v.checksums_verified}\n")
    if v.shadow is None:
        out.append("shadow check: not sampled", "dim")
    else:
        agrees, delta = v.shadow
        out.append("shadow check: top-1 ")
        out.append("agrees" if agrees else "DIFFERS", "green" if agrees else "bold red")
        out.append(f", max |Δlogit| {delta:.3f}")
    if v.draft:
        out.append("\nspeculation: ").append(describe_draft(ev, step))
    return out


class TokenDetail(Static):
    def on_mount(self) -> None:
        self.border_title = "token"
        self.show(None)

    def show(self, ev: TokenEvent | None, step: tuple[int, int, int] | None = None) -> None:
        self.update(describe_token(ev, step) if ev is not None else Text(HINT, "dim"))
