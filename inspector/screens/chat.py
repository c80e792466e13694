"""Chat screen: the conversation, streamed tokens coloured by verdict, token details, status."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from inspector.messages import NewConversation, SendPrompt, StopGeneration, TokenSelected
from inspector.screens.model_info import ModelInfoScreen
from inspector.transcript import verify_step
from inspector.widgets.reply import ReplyView, UserMessage
from inspector.widgets.status_line import StatusLine
from inspector.widgets.token_detail import TokenDetail
from runtime.telemetry import EngineSnapshot

if TYPE_CHECKING:
    from inspector.app import KvscopeApp

HINT = (
    "Type a message and press Enter. Tab moves into a reply: ←/→ pick a token "
    "(or click one) to see its integrity verdict. F2 opens the cache inspector."
)


class Transcript(VerticalScroll, can_focus=False):
    """The conversation; the replies inside it take focus, not the scroller."""


class ChatScreen(Screen[None]):
    AUTO_FOCUS = "#prompt"
    BINDINGS = [
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+s", "stop", "Stop", show=False),
        Binding("f3", "model_info", "Model info"),
        Binding("tab", "focus_reply", "Pick token", show=False),
    ]

    @property
    def kv_app(self) -> KvscopeApp:
        return cast("KvscopeApp", self.app)

    def compose(self) -> ComposeResult:
        yield Static(id="chat-title", classes="title")
        with Container(id="chat-body"):
            with Transcript(id="transcript"):
                yield Static(HINT, id="chat-hint")
            yield TokenDetail(id="token-detail")
        yield StatusLine(id="chat-status")
        yield Input(placeholder="Message the model (Enter to send)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self._views: list[UserMessage | ReplyView] = []
        app = self.kv_app
        app.session_signal.subscribe(self, self._on_session)
        app.snapshot_signal.subscribe(self, self._on_snapshot)
        self.query_one("#prompt", Input).focus()  # never let the transcript take the keys
        self._render_title()
        self._on_session(None)

    def on_screen_resume(self) -> None:
        if hasattr(self, "_views"):
            self._on_session(None)
            self._on_snapshot(self.kv_app.snapshot)
        self.query_one("#prompt", Input).focus()  # coming back to chat means typing

    # ---------------------------------------------------------- updates
    def _render_title(self) -> None:
        info = self.kv_app.model_info
        name = info.get("model") or info.get("name") or "model"
        self.query_one("#chat-title", Static).update(
            f"[b]kvscope[/b] chat │ {name} │ {info.get('device', '')}"
        )

    def _on_snapshot(self, snap: EngineSnapshot | None) -> None:
        app = self.kv_app
        session = app.session
        reply = session.active
        if reply is None:
            replies = [t.reply for t in session.turns if t.reply is not None]
            reply = replies[-1] if replies else None
        self.query_one(StatusLine).show(snap, reply, paused=app.paused)

    def _on_session(self, _: object) -> None:
        """Reconcile transcript widgets with the session (new turns, tokens, a cleared chat)."""
        turns = self.kv_app.session.turns
        transcript = self.query_one(Transcript)
        stale = len(self._views) > len(turns) or any(
            v.turn is not t for v, t in zip(self._views, turns, strict=False)
        )
        if stale:
            transcript.remove_children(self._views)
            self._views = []
            self.query_one(TokenDetail).show(None)
        new = [
            UserMessage(t) if t.reply is None else ReplyView(t) for t in turns[len(self._views) :]
        ]
        if new:
            transcript.mount_all(new)
            self._views += new
        changed = bool(new)
        for view in self._views:
            if isinstance(view, ReplyView):
                changed = view.sync() or changed
        self.query_one("#chat-hint").display = not turns
        if changed and not isinstance(self.focused, ReplyView):
            transcript.scroll_end(animate=False)
        self._on_snapshot(self.kv_app.snapshot)

    # ---------------------------------------------------------- events
    @on(Input.Submitted, "#prompt")
    def _send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self.kv_app.session.active is not None:
            self.notify("Still generating: press Esc to stop it first.", severity="warning")
            return
        event.input.clear()
        self.post_message(SendPrompt(text))

    @on(TokenSelected)
    def _show_token(self, event: TokenSelected) -> None:
        reply = self.kv_app.session.reply(event.request_id)
        if reply is not None and 0 <= event.index < len(reply.tokens):
            step = verify_step(reply.tokens, event.index)
            self.query_one(TokenDetail).show(reply.tokens[event.index], step)
            self.add_class("-token-selected")

    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        self.set_class(isinstance(event.widget, ReplyView), "-picking")

    # ---------------------------------------------------------- actions
    def action_focus_reply(self) -> None:
        """Tab from the prompt goes to the newest reply; elsewhere it moves focus as usual."""
        replies = [v for v in self._views if isinstance(v, ReplyView)]
        if isinstance(self.focused, Input) and replies:
            replies[-1].focus()
        else:
            self.focus_next()

    def action_new_conversation(self) -> None:
        self.post_message(NewConversation())
        self.remove_class("-token-selected")
        self.query_one("#prompt", Input).focus()

    def action_stop(self) -> None:
        if self.kv_app.session.active is not None:
            self.post_message(StopGeneration())

    def action_model_info(self) -> None:
        # model_info() reads plain attributes (no engine lock): refreshed here so that live
        # entries (the decode path while CPU graphs compile) are current
        self.kv_app.model_info = dict(self.kv_app.engine.model_info())
        self.app.push_screen(ModelInfoScreen(self.kv_app.model_info, self.kv_app.snapshot))
