"""The chat status line: rate, time to first token, cached tokens by tier, verdict counts."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from inspector.format import VERDICT_MARK, fmt_accept, fmt_rate, fmt_secs
from inspector.transcript import Reply
from runtime.telemetry import TIERS, EngineSnapshot

_MARK_STYLE = {"ok": "green", "suspect": "yellow", "corrupt": "bold red"}


def status_text(snap: EngineSnapshot | None, reply: Reply | None, *, paused: bool) -> Text:
    out = Text()
    if paused:
        out.append(" PAUSED ", "black on yellow").append(" ")
    if reply is None:
        out.append("idle", "dim")
        if snap is not None:
            l1 = next((t for t in snap.tiers if t.tier == "L1"), None)
            if l1 is not None:
                out.append(f" │ L1 {l1.pages_used}/{l1.pages_total} pages", "dim")
        return out
    info = None
    if snap is not None:
        info = next((r for r in snap.requests if r.request_id == reply.request_id), None)
    if reply.finished:
        out.append(f"■ {reply.finish_reason}", "dim")
    else:
        out.append("● generating", "bold green")
    out.append(f" {reply.request_id} │ ")
    out.append(fmt_rate(info.tok_per_s if info else None))
    out.append(" │ TTFT " + fmt_secs(info.ttft_s if info else None))
    cached = info.cached_tokens if info else {}
    out.append(" │ cached " + " ".join(f"{t} {cached.get(t, 0)}" for t in TIERS))
    if info is not None and info.accept_length is not None:  # speculative decoding
        length, rate = fmt_accept(info.accept_length, info.accept_rate)
        out.append(f" │ accept {length} ({rate})")
    out.append(" │")
    counts = reply.verdict_counts()
    for verdict, mark in VERDICT_MARK.items():
        out.append(f" {mark}{counts.get(verdict, 0)}", _MARK_STYLE[verdict])
    return out


class StatusLine(Static):
    def show(self, snap: EngineSnapshot | None, reply: Reply | None, *, paused: bool) -> None:
        self.update(status_text(snap, reply, paused=paused))
