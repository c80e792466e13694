"""Transcript widgets: a user message, and a reply whose tokens carry their integrity verdict
(colour) and their speculative draft status (text style, inspector/format.token_style)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Static

from inspector.format import token_style
from inspector.messages import TokenSelected
from inspector.transcript import Reply, Turn


class UserMessage(Static):
    def __init__(self, turn: Turn) -> None:
        super().__init__(Text(turn.text), classes="user-message", markup=False)
        self.turn = turn


class ReplyView(Widget, can_focus=True):
    """One assistant reply. Focus it (Tab or click) and move over its tokens with the cursor keys;
    the selected token's verdict is posted as `TokenSelected`."""

    BINDINGS = [
        Binding("left", "move(-1)", "Prev token", show=False),
        Binding("right", "move(1)", "Next token", show=False),
        Binding("home", "move_to(0)", "First token", show=False),
        Binding("end", "move_to(-1)", "Last token", show=False),
    ]

    cursor: reactive[int | None] = reactive(None)

    def __init__(self, turn: Turn) -> None:
        super().__init__(classes="reply")
        assert turn.reply is not None
        self.turn = turn
        self.reply: Reply = turn.reply
        self._rendered = (-1, False)

    def sync(self) -> bool:
        """Re-render if tokens arrived or the reply finished; return True when it changed."""
        state = (len(self.reply.tokens), self.reply.finished)
        if state == self._rendered:
            return False
        self._rendered = state
        self.set_class(self.reply.finished, "-finished")
        self.refresh(layout=True)
        return True

    def render(self) -> Text:
        reply, text = self.reply, Text()
        for i, tok in enumerate(reply.tokens):
            body = tok.text
            word = body.lstrip()
            text.append(body[: len(body) - len(word)])
            style = token_style(tok.verdict) + Style(meta={"token": i})
            if i == self.cursor:
                style += Style(reverse=True, bold=True)
                word = word or "·"
            text.append(word, style)
        if reply.error:
            text.append(f"  error: {reply.error}", "bold red")
        elif not reply.finished:
            text.append(" ▍" if reply.tokens else "…", "dim")
        elif reply.finish_reason == "abort":
            text.append("  [stopped]", "dim italic")
        return text

    def on_focus(self) -> None:
        if self.cursor is None and self.reply.tokens:
            self.cursor = len(self.reply.tokens) - 1

    def on_click(self, event: events.Click) -> None:
        index = event.style.meta.get("token")
        if isinstance(index, int):
            self.cursor = index
            self.focus()

    def action_move(self, delta: int) -> None:
        if self.reply.tokens:
            start = len(self.reply.tokens) if self.cursor is None else self.cursor
            self.cursor = min(len(self.reply.tokens) - 1, max(0, start + delta))

    def action_move_to(self, index: int) -> None:
        if self.reply.tokens:
            self.cursor = index % len(self.reply.tokens)

    def watch_cursor(self, cursor: int | None) -> None:
        self.refresh()
        if cursor is not None:
            self.post_message(TokenSelected(self.reply.request_id, cursor))
