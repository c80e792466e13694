"""The chat transcript (ChatSession, turns, replies): the conversation as plain data, mutated only
on the UI thread.

The chat screen renders it; the app feeds it token events. Keeping it out of the widgets lets
the transcript survive screen switches and be tested without Textual.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from runtime.telemetry import TokenEvent


@dataclass
class Reply:
    request_id: str
    tokens: list[TokenEvent] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def verdict_counts(self) -> Counter[str]:
        return Counter(t.verdict.verdict for t in self.tokens)


def verify_step(tokens: list[TokenEvent], index: int) -> tuple[int, int, int] | None:
    """(drafted, accepted, rejected) of the speculative verify step that produced
    tokens[index], or None if it came from a step without drafts. A verify step streams its
    accepted drafts ("accepted") then the target's own token ("target", carrying how many
    drafts the step rejected), all in one engine step."""
    if not tokens[index].verdict.draft:
        return None
    end = index
    while end < len(tokens) and tokens[end].verdict.draft == "accepted":
        end += 1
    start = index
    while start > 0 and tokens[start - 1].verdict.draft == "accepted":
        start -= 1
    accepted = end - start
    rejected = tokens[end].verdict.rejected if end < len(tokens) else 0
    return accepted + rejected, accepted, rejected


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str = ""
    reply: Reply | None = None


class ChatSession:
    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.active: Reply | None = None
        self._replies: dict[str, Reply] = {}

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages (errored or empty replies are left out)."""
        out = []
        for turn in self.turns:
            if turn.reply is None:
                out.append({"role": turn.role, "content": turn.text})
            elif turn.reply.error is None and turn.reply.text:
                out.append({"role": "assistant", "content": turn.reply.text})
        return out

    def send(self, text: str, request_id: str) -> Reply:
        """Add a user turn and the (empty) reply that will stream into it."""
        assert self.active is None, "one reply at a time"
        reply = Reply(request_id)
        self.turns += [Turn("user", text), Turn("assistant", reply=reply)]
        self._replies[request_id] = self.active = reply
        return reply

    def reply(self, request_id: str) -> Reply | None:
        return self._replies.get(request_id)

    def apply(self, events: tuple[TokenEvent, ...] | list[TokenEvent]) -> set[str]:
        """Append streamed tokens to their replies; return the ids of replies that changed.

        Events of unknown requests (e.g. batch work on the same engine) and of replies already
        finished (stopped by the user) are ignored.
        """
        changed = set()
        for ev in events:
            reply = self._replies.get(ev.request_id)
            if reply is None or reply.finished:
                continue
            if ev.text or ev.token_id >= 0:
                reply.tokens.append(ev)
            if ev.finished:
                self._finish(reply, ev.finish_reason or "stop")
            changed.add(ev.request_id)
        return changed

    def stop(self) -> str | None:
        """Mark the active reply stopped; return its request id (to abort) or None."""
        reply = self.active
        if reply is None:
            return None
        self._finish(reply, "abort")
        return reply.request_id

    def fail(self, request_id: str, error: str) -> None:
        reply = self._replies.get(request_id)
        if reply is not None:
            reply.error = error
            self._finish(reply, "error")

    def clear(self) -> None:
        self.turns.clear()
        self._replies.clear()
        self.active = None

    def _finish(self, reply: Reply, reason: str) -> None:
        reply.finished, reply.finish_reason = True, reason
        if self.active is reply:
            self.active = None
