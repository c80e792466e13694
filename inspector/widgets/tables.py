"""The requests table and the per-token integrity log (DataTables rebuilt when data changes)."""

from __future__ import annotations

from collections import Counter

from rich.text import Text
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from inspector.format import EVENT_STYLE, VERDICT_STYLE, fmt_accept, fmt_secs
from inspector.messages import AbortRequest
from runtime.telemetry import TIERS, IntegrityEvent, RequestInfo

_STATUS_STYLE = {"decode": "bold green", "prefill": "cyan", "waiting": "yellow", "error": "red",
                 "aborted": "dim", "finished": "dim"}  # fmt: skip


class RequestsTable(DataTable):
    BINDINGS = [Binding("x", "abort", "Abort request")]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._last: tuple[RequestInfo, ...] | None = None

    def on_mount(self) -> None:
        # acc len / acc %: speculative accept length (tokens per verify step) and rate
        self.add_columns("request", "status", "prompt", "gen", *TIERS, "pages", "TTFT", "tok/s",
                         "acc len", "acc %", "verdict")  # fmt: skip

    def show(self, requests: tuple[RequestInfo, ...]) -> None:
        if requests == self._last:
            return
        self._last = requests
        keep = self.cursor_row
        self.clear()
        for r in requests:
            self.add_row(
                r.request_id,
                Text(r.status, _STATUS_STYLE.get(r.status, "")),
                r.prompt_tokens,
                r.generated_tokens,
                *(r.cached_tokens.get(t, 0) for t in TIERS),
                r.pages,
                fmt_secs(r.ttft_s),
                "–" if r.tok_per_s is None else f"{r.tok_per_s:.1f}",
                *fmt_accept(r.accept_length, r.accept_rate),
                Text(r.verdict, VERDICT_STYLE.get(r.verdict, "")),
                key=r.request_id,
            )
        if requests:
            self.move_cursor(row=min(keep, len(requests) - 1), animate=False)

    def action_abort(self) -> None:
        if self._last and 0 <= self.cursor_row < len(self._last):
            self.post_message(AbortRequest(self._last[self.cursor_row].request_id))


def event_counts(events: tuple[IntegrityEvent, ...]) -> Text:
    kinds = Counter(e.kind for e in events)
    violations = sum(n for k, n in kinds.items() if k not in EVENT_STYLE)
    out = Text()
    out.append(f"violations {violations}", "bold red" if violations else "green")
    out.append(f" · injected {kinds.get('inject', 0)}", "magenta")
    out.append(f" · recoveries {kinds.get('recovery', 0)}", "green")
    if kinds.get("acceptance"):  # speculative acceptance detections (a kind of their own)
        out.append(f" · acceptance {kinds['acceptance']}", EVENT_STYLE["acceptance"])
    detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()) if k not in EVENT_STYLE)
    if detail:
        out.append(f"  ({detail})", "dim")
    return out


class IntegrityLog(Vertical):
    """Counts of violations / injected faults / recoveries, and the newest events first."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._last: tuple[IntegrityEvent, ...] | None = None

    def compose(self):
        yield Static(id="integrity-counts")
        yield DataTable(id="integrity-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("t (s)", "request", "kind", "pages", "detail")
        self.query_one("#integrity-counts", Static).update(event_counts(()))

    def show(self, events: tuple[IntegrityEvent, ...]) -> None:
        if events == self._last:
            return
        self._last = events
        self.query_one("#integrity-counts", Static).update(event_counts(events))
        table = self.query_one(DataTable)
        table.clear()
        for ev in reversed(events):
            style = EVENT_STYLE.get(ev.kind, "bold red")
            pages = " ".join(map(str, ev.pages[:6])) + (" …" if len(ev.pages) > 6 else "")
            table.add_row(f"{ev.time_s:.2f}", ev.request_id, Text(ev.kind, style), pages, ev.detail)
