"""The selected token's integrity verdict, spelled out."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from inspector.format import VERDICT_STYLE
from runtime.telemetry import TokenEvent

HINT = "Tab to a reply, then ←/→ (or click a token) to see its integrity verdict."


def _flag(ok: bool) -> Text:
    return Text("✓ ok", "green") if ok else Text("✗ FAILED", "bold red")


def describe_token(ev: TokenEvent) -> Text:
    v = ev.verdict
    out = Text()
    out.append(f"token {ev.index} of {ev.request_id}  ", "bold")
    out.append(repr(ev.text.strip() or ev.text))
    out.append(f"  id {ev.token_id}\n", "dim")
    out.append("verdict ")
    out.append(f" {v.verdict.upper()} ", VERDICT_STYLE.get(v.verdict, ""))
    out.append("\n")
    for reason in v.reasons:
        out.append(f"  • {reason}\n", "yellow")
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
    return out


class TokenDetail(Static):
    def on_mount(self) -> None:
        self.border_title = "token"
        self.show(None)

    def show(self, ev: TokenEvent | None) -> None:
        self.update(describe_token(ev) if ev is not None else Text(HINT, "dim"))
