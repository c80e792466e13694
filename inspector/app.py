"""KvscopeApp: one Textual app over one running engine (chat on F1, cache inspector on F2).

Threading: a single driver worker thread owns every engine call that may block (`submit`,
`abort`, `step`, `has_work`) and posts `EngineStepped` messages to the app. A timer on the UI
thread asks for a snapshot ~10 times a second; a short-lived poller thread calls
`engine.snapshot()` (which may wait for a running step) and posts it back, so the UI never blocks
on the engine. The UI thread calls the engine directly only for `model_info()` (at start and on
F3; it takes no lock) and for `snapshot()` when the engine is known to be idle (at start, after
a manual step). Widgets are only touched on the UI thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Literal

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.signal import Signal
from textual.worker import get_current_worker

from inspector.engine_protocol import EngineProtocol
from inspector.history import TelemetryHistory
from inspector.messages import (
    AbortRequest,
    CommandFailed,
    EngineFailed,
    EngineStepped,
    NewConversation,
    SendPrompt,
    SnapshotPolled,
    StopGeneration,
)
from inspector.screens.chat import ChatScreen
from inspector.screens.inspect import InspectScreen
from inspector.transcript import ChatSession
from runtime.telemetry import EngineSnapshot, TokenEvent

ScreenName = Literal["chat", "inspect"]


class KvscopeApp(App[None]):
    CSS_PATH = "kvscope.tcss"
    TITLE = "kvscope"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("f1", "switch_mode('chat')", "Chat"),
        Binding("f2", "switch_mode('inspect')", "Inspector"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        engine: EngineProtocol,
        start_screen: ScreenName = "chat",
        *,
        paused: bool = False,
        poll_interval: float = 0.1,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if start_screen not in ("chat", "inspect"):
            raise ValueError(f"start_screen must be 'chat' or 'inspect', not {start_screen!r}")
        super().__init__()
        self.engine = engine
        self.start_screen = start_screen
        self.poll_interval = poll_interval
        self.sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        self.session = ChatSession()
        self.history = TelemetryHistory()
        self.snapshot: EngineSnapshot | None = None
        self.model_info: dict[str, str] = {}
        self.steps_seen = 0  # EngineStepped messages handled (tests wait on it)
        self.session_signal: Signal[None] = Signal(self, "session")
        self.snapshot_signal: Signal[EngineSnapshot | None] = Signal(self, "snapshot")
        self._paused = paused
        self._manual_steps = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: queue.SimpleQueue[tuple[str | None, Callable[[], object]]] = (
            queue.SimpleQueue()
        )
        self._next_chat = 0
        self._polling = False
        self._session_dirty = False
        self.add_mode("chat", ChatScreen)
        self.add_mode("inspect", InspectScreen)

    # ------------------------------------------------------------ lifecycle
    async def on_mount(self) -> None:
        self.model_info = dict(self.engine.model_info())
        self.refresh_snapshot()
        self.set_interval(self.poll_interval, self._poll)
        self._drive_engine()
        await self.switch_mode(self.start_screen)

    def on_unmount(self) -> None:
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def refresh_snapshot(self) -> None:
        """Take a snapshot on the UI thread: only when no step can be running."""
        self._apply_snapshot(self.engine.snapshot())

    def _apply_snapshot(self, snap: EngineSnapshot) -> None:
        if self.snapshot is not None and snap.time_s < self.snapshot.time_s:
            return  # a poll that started before a newer snapshot landed
        self.snapshot = snap
        self.history.add(snap)
        self.snapshot_signal.publish(snap)

    def _poll(self) -> None:
        if not self._polling:
            self._polling = True
            self._poll_snapshot()

    @work(thread=True, group="snapshot", name="snapshot poller")
    def _poll_snapshot(self) -> None:
        try:
            snap: EngineSnapshot | None = self.engine.snapshot()
        except Exception as exc:  # keep polling; say it once per failure
            self.log.error(f"engine.snapshot() failed: {exc!r}")
            snap = None
        self.post_message(SnapshotPolled(snap))

    def on_snapshot_polled(self, message: SnapshotPolled) -> None:
        self._polling = False
        self._session_dirty = False
        if message.snapshot is not None:
            self._apply_snapshot(message.snapshot)

    # ------------------------------------------------------------ driver thread
    def send_command(self, fn: Callable[[], object], request_id: str | None = None) -> None:
        """Run `fn` on the driver thread, in order with other commands and between steps."""
        self._commands.put((request_id, fn))
        self._wake.set()

    @work(thread=True, exclusive=True, group="engine", name="engine driver")
    def _drive_engine(self) -> None:
        worker = get_current_worker()
        engine = self.engine
        while not worker.is_cancelled:
            while not self._commands.empty():
                request_id, fn = self._commands.get()
                try:
                    result = fn()
                except Exception as exc:  # shown to the user
                    self.post_message(CommandFailed(request_id, f"{type(exc).__name__}: {exc}"))
                    continue
                if isinstance(result, list) and result and isinstance(result[0], TokenEvent):
                    self.post_message(EngineStepped(tuple(result)))  # e.g. abort's final event
            with self._lock:
                manual = self._paused and self._manual_steps > 0
                if manual:
                    self._manual_steps -= 1
                blocked = self._paused and not manual
            try:
                idle = blocked or not engine.has_work()
                events = [] if idle else engine.step()
            except Exception as exc:  # a failing engine must not kill the UI
                with self._lock:
                    self._paused = True
                self.post_message(EngineFailed(f"{type(exc).__name__}: {exc}"))
                continue
            if idle:
                if manual:
                    self.post_message(EngineStepped((), manual=True))
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            if events or manual:
                self.post_message(EngineStepped(tuple(events), manual=manual))

    # ------------------------------------------------------------ actions
    def action_toggle_pause(self) -> None:
        with self._lock:
            self._paused = not self._paused
            self._manual_steps = 0
        self._wake.set()
        self.snapshot_signal.publish(self.snapshot)  # screens show the new state

    def action_step_once(self) -> None:
        """While paused, run exactly one engine step."""
        if not self._paused:
            self.notify("Pause the engine first (p), then step with '.'")
            return
        with self._lock:
            self._manual_steps += 1
        self._wake.set()

    # ------------------------------------------------------------ messages
    def on_engine_stepped(self, message: EngineStepped) -> None:
        self.steps_seen += 1
        if self.session.apply(message.events) and not self._session_dirty:
            # coalesce: one transcript update after the queued steps, not one per step
            self._session_dirty = True
            self.call_later(self._publish_session)
        if message.manual:
            self.refresh_snapshot()  # one chart point per manual step

    def _publish_session(self) -> None:
        self._session_dirty = False
        self.session_signal.publish(None)

    def on_engine_failed(self, message: EngineFailed) -> None:
        self.notify(f"engine step failed, engine paused: {message.error}", severity="error")
        self.snapshot_signal.publish(self.snapshot)

    def on_command_failed(self, message: CommandFailed) -> None:
        if message.request_id is not None and self.session.reply(message.request_id):
            self.session.fail(message.request_id, message.error)
            self.session_signal.publish(None)
        else:
            self.notify(message.error, severity="error")

    @on(SendPrompt)
    def _send_prompt(self, message: SendPrompt) -> None:
        self._next_chat += 1
        request_id = f"chat-{self._next_chat}"
        self.session.send(message.text, request_id)
        messages = self.session.messages()
        engine, sampling = self.engine, dict(self.sampling)
        self.send_command(
            lambda: engine.submit(messages=messages, request_id=request_id, **sampling),
            request_id,
        )
        self.session_signal.publish(None)

    @on(StopGeneration)
    def _stop(self) -> None:
        request_id = self.session.stop()
        if request_id is not None:
            self.send_command(lambda: self.engine.abort(request_id))
            self.session_signal.publish(None)

    @on(NewConversation)
    def _new_conversation(self) -> None:
        self._stop()
        self.session.clear()
        self.session_signal.publish(None)

    @on(AbortRequest)
    def _abort(self, message: AbortRequest) -> None:
        if self.session.active and self.session.active.request_id == message.request_id:
            self._stop()
        else:
            self.send_command(lambda: self.engine.abort(message.request_id))


def run_app(engine: EngineProtocol, screen: ScreenName = "chat", **options: object) -> None:
    """Run the TUI on `engine` until the user quits (blocks). Options go to `KvscopeApp`."""
    KvscopeApp(engine, screen, **options).run()  # type: ignore[arg-type]
