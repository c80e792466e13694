"""OpenAI request bodies -> validated `GenRequest`; OpenAI-style errors.

Bodies are parsed by hand (not by pydantic models) so every bad field gets one clear message
naming the field, in the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class APIError(Exception):
    """An error reply: HTTP status + OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256


@dataclass
class GenRequest:
    kind: str  # "chat" | "completion"
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    prompt: str | None = None  # completions: text
    prompt_ids: list[int] | None = None  # completions: token ids
    messages: list[dict] = field(default_factory=list)  # chat: as the template wants them
    tools: list[dict] | None = None  # chat: OpenAI tool specs, passed to the template


def parse_json(raw: bytes, limits: Limits) -> dict:
    if len(raw) > limits.max_body_bytes:
        raise APIError(
            413,
            f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}",
            code="body_too_large",
        )
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise bad(f"'{key}' must be a number in [{lo}, {hi}], got {v!r}", key)
    return float(v)


def _int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(f"'{key}' must be an integer in [{lo}, {hi}], got {v!r}", key)
    return v


def _common(body: dict, kind: str, models: tuple[str, ...], limits: Limits) -> dict:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required (a string; see GET /v1/models)", "model")
    if model not in models:
        raise APIError(
            404,
            f"model {model!r} does not exist; this server serves {', '.join(models)}",
            param="model",
            code="model_not_found",
        )
    n = _int(body, "n", 1, 1 << 30)
    if n not in (None, 1):
        raise bad(f"'n' = {n}: only n = 1 is supported", "n", "unsupported_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not stream):
        raise bad("'stream_options' must be an object and needs 'stream': true", "stream_options")
    include_usage = bool((opts or {}).get("include_usage", False))
    keys = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens = None
    for key in keys:
        max_tokens = max_tokens or _int(body, key, 1, 1 << 30)
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise bad(
                f"'{key}' = {max_tokens} is over this server's limit of {limits.max_tokens}",
                key,
            )
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise bad("'stop' must be a string or a list of at most 4 strings", "stop")
    return dict(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens or min(limits.default_max_tokens, limits.max_tokens),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=_int(body, "seed", 0, (1 << 63) - 1),
        stop=tuple(s for s in stop if s),
    )


def parse_completion(body: dict, models: tuple[str, ...], limits: Limits) -> GenRequest:
    req = GenRequest(**_common(body, "completion", models, limits))
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        req.prompt = p
    elif (
        isinstance(p, list)
        and p
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p)
    ):
        req.prompt_ids = list(p)
    else:
        raise bad(
            "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
            "prompt",
        )
    return req


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _text(content, where: str) -> str:
    """OpenAI content: a string or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise bad(f"{where}.content must be a string or a list of text parts", where)


def _tool_calls_for_template(calls, where: str) -> list[dict]:
    """OpenAI assistant tool_calls (arguments: a JSON string) -> the template's dicts."""
    if not isinstance(calls, list):
        raise bad(f"{where}.tool_calls must be a list", where)
    out = []
    for i, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}.tool_calls[{i}] needs function.name", where)
        args = fn.get("arguments") or "{}"
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise bad(f"{where}.tool_calls[{i}].function.arguments is not JSON", where) from None
        if not isinstance(args, dict):
            raise bad(f"{where}.tool_calls[{i}].function.arguments must be an object", where)
        out.append({"id": c.get("id"), "type": "function", "name": fn["name"], "arguments": args})
        out[-1]["function"] = {"name": fn["name"], "arguments": args}
    return out


def parse_chat(body: dict, models: tuple[str, ...], limits: Limits) -> GenRequest:
    req = GenRequest(**_common(body, "chat", models, limits))
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise bad(f"{where} must be an object with a role in {', '.join(_ROLES)}", where)
        role = "system" if m["role"] == "developer" else m["role"]
        out = {"role": role, "content": _text(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls"):
            out["tool_calls"] = _tool_calls_for_template(m["tool_calls"], where)
        if role == "assistant" and isinstance(m.get("reasoning_content"), str):
            out["reasoning_content"] = m["reasoning_content"]
        if role == "tool" and m.get("tool_call_id") is not None:
            out["tool_call_id"] = str(m["tool_call_id"])
        req.messages.append(out)
    tools = body.get("tools")
    if tools is not None:
        ok = isinstance(tools, list) and all(
            isinstance(t, dict)
            and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str)
            for t in tools
        )
        if not ok:
            raise bad("'tools' must be a list of {type: function, function: {name, ...}}", "tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad("'tool_choice' supports 'auto' and 'none' only", "tool_choice")
    req.tools = tools if tools and choice != "none" else None
    return req
