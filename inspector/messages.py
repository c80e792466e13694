"""Dataclass messages between the engine driver thread, the screens and the app."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from runtime.telemetry import EngineSnapshot, TokenEvent


@dataclass
class EngineStepped(Message):
    """Posted by the driver thread after a step that produced tokens (or a manual step)."""

    events: tuple[TokenEvent, ...]
    manual: bool = False


@dataclass
class EngineFailed(Message):
    """`engine.step()` raised; the driver pauses itself."""

    error: str


@dataclass
class CommandFailed(Message):
    """A queued engine command (submit / abort) raised."""

    request_id: str | None
    error: str


@dataclass
class SendPrompt(Message):
    """The user sent a chat message (chat screen -> app)."""

    text: str


@dataclass
class StopGeneration(Message):
    """Abort the reply being generated (chat screen -> app)."""


@dataclass
class NewConversation(Message):
    """Forget the conversation (chat screen -> app)."""


@dataclass
class AbortRequest(Message):
    """Abort one request by id (inspector -> app)."""

    request_id: str


@dataclass
class TokenSelected(Message):
    """A token of a reply was selected (reply view -> chat screen)."""

    request_id: str
    index: int


@dataclass
class SlotSelected(Message):
    """An L1 page slot was selected in the page map (page map -> inspector screen)."""

    slot: int


@dataclass
class SnapshotPolled(Message):
    """The poller thread fetched a snapshot (None when `engine.snapshot()` raised)."""

    snapshot: EngineSnapshot | None
