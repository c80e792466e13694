"""GLM output parser: `<think>` reasoning and `<tool_call>` blocks -> OpenAI fields.

GLM-4.5 / GLM-5 write tool calls as

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    </tool_call>

and reasoning as `<think>...</think>` before the answer (the convention vLLM and SGLang use:
reasoning goes to `reasoning_content`). `GlmParser.feed()` takes text deltas as they stream and
returns `Piece`s; it never emits a prefix of a tag that may still complete (a held-back tail),
and a tool call is emitted whole once `</tool_call>` arrived. `finish()` flushes the tail.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


@dataclass(frozen=True)
class Piece:
    kind: str  # "content" | "reasoning" | "tool_call"
    text: str = ""
    call: ToolCall | None = None


def parse_tool_call(body: str) -> ToolCall | None:
    """The text between <tool_call> and </tool_call> -> ToolCall (None if it has no name).
    Values are JSON-decoded when they parse (numbers, objects, booleans), else kept as strings."""
    cut = body.find("<arg_key>")
    name = (body if cut < 0 else body[:cut]).strip()
    if not name or "<" in name:
        return None
    args = {}
    for key, value in _ARG.findall(body):
        try:
            args[key.strip()] = json.loads(value)
        except ValueError:
            args[key.strip()] = value
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class GlmParser:
    """Incremental splitter of generated text into content, reasoning and tool calls."""

    def __init__(self, in_think: bool = False):
        self._state = "think" if in_think else "content"
        self._buf = ""

    def feed(self, delta: str) -> list[Piece]:
        self._buf += delta
        out: list[Piece] = []
        while self._buf:
            if self._state == "tool":
                end = self._buf.find(TOOL_CLOSE)
                if end < 0:
                    break  # a tool call is emitted whole
                body, self._buf = self._buf[:end], self._buf[end + len(TOOL_CLOSE) :]
                call = parse_tool_call(body)
                if call is not None:
                    out.append(Piece("tool_call", call=call))
                else:  # not a call after all: keep the text visible
                    out.append(Piece("content", TOOL_OPEN + body + TOOL_CLOSE))
                self._state = "content"
                continue
            kind = self._state  # "content" or "think"
            tags = (THINK_OPEN, TOOL_OPEN) if kind == "content" else (THINK_CLOSE,)
            hits = [(i, t) for t in tags if (i := self._buf.find(t)) >= 0]
            if hits:
                i, tag = min(hits)
                self._emit(out, kind, self._buf[:i])
                self._buf = self._buf[i + len(tag) :]
                self._state = {THINK_OPEN: "think", TOOL_OPEN: "tool", THINK_CLOSE: "content"}[tag]
                continue
            hold = _partial_suffix(self._buf, tags)
            self._emit(out, kind, self._buf[: len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold :]
            break
        return out

    def finish(self) -> list[Piece]:
        """End of generation: flush what was held back (an unclosed tool call stays text)."""
        out: list[Piece] = []
        if self._state == "tool":
            self._emit(out, "content", TOOL_OPEN + self._buf)
        else:
            self._emit(out, self._state, self._buf)
        self._buf, self._state = "", "content"
        return out

    @staticmethod
    def _emit(out: list[Piece], state: str, text: str) -> None:
        if text:
            out.append(Piece("reasoning" if state == "think" else "content", text))


@dataclass
class ParsedReply:
    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]


def parse_reply(text: str, in_think: bool = False) -> ParsedReply:
    """A whole reply at once (non-streaming): the same parser, fed in one piece."""
    p = GlmParser(in_think)
    pieces = p.feed(text) + p.finish()
    content = "".join(x.text for x in pieces if x.kind == "content").strip()
    reasoning = "".join(x.text for x in pieces if x.kind == "reasoning").strip()
    calls = [x.call for x in pieces if x.kind == "tool_call" and x.call is not None]
    return ParsedReply(content or None, reasoning or None, calls)
