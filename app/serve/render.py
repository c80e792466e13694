"""OpenAI reply bodies: usage with cached tokens, the `kvscope` extension, chunks, SSE lines."""

from __future__ import annotations

import json
import time
import uuid

from app.serve.glm_parser import ToolCall
from app.serve.runner import Outcome


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def usage(o: Outcome) -> dict:
    cached = sum(o.cached_tokens.values())
    return {
        "prompt_tokens": o.prompt_tokens,
        "completion_tokens": o.completion_tokens,
        "total_tokens": o.prompt_tokens + o.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def extension(o: Outcome, request_id: str) -> dict:
    """kvscope's own fields: prefix tokens served per tier, the integrity verdict, and the
    speculative decoding stats with the acceptance detector's verdict (app/speculation.py)."""
    return {
        "request_id": request_id,
        "cached_tokens": {t: int(o.cached_tokens.get(t, 0)) for t in ("L1", "L2", "L3")},
        "verdict": o.verdict,
        "violations": list(o.violations),
        "ttft_s": None if o.ttft_s is None else round(o.ttft_s, 6),
        "speculation": o.speculation,  # steps, drafted, accepted, accept_length, accept_rate
        "acceptance": o.acceptance,  # the acceptance detector's flags, None if never flagged
    }


def tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    d = {
        "id": new_id("call"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    if index is not None:
        d = {"index": index, **d}
    return d


def finish_reason(o: Outcome, has_tool_calls: bool = False) -> str:
    if has_tool_calls and o.finish_reason == "stop":
        return "tool_calls"
    return "length" if o.finish_reason == "length" else "stop"


class Envelope:
    """The fields every reply / chunk of one request repeats."""

    def __init__(self, kind: str, model: str):
        self.kind, self.model = kind, model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    def chunk(self, choice: dict | None, **extra) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        choices = [] if choice is None else [{"index": 0, **choice}]
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def reply(self, choice: dict, o: Outcome, request_id: str) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice}],
            "usage": usage(o),
            "kvscope": extension(o, request_id),
        }
