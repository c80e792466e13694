"""The FastAPI app: OpenAI routes, auth, limits, SSE streaming, metrics and the snapshot stream.

`create_app(engine, ServeOptions(...))` returns an ASGI app whose lifespan starts and stops the
engine thread (app/serve/runner.py). Every error reply has the OpenAI shape
`{"error": {"message", "type", "param", "code"}}`; no route answers with a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.serve import render
from app.serve.glm_parser import GlmParser, parse_reply
from app.serve.metrics import prometheus_text
from app.serve.protocol import (
    APIError,
    GenRequest,
    Limits,
    parse_chat,
    parse_completion,
    parse_json,
)
from app.serve.runner import Accepted, EngineRunner, Failure, Outcome, Overloaded, Ticket
from runtime.errors import KvscopeError
from runtime.sampling import SamplingParams


@dataclass(frozen=True)
class ServeOptions:
    model_name: str = "kvscope"
    api_key: str | None = None
    limits: Limits = Limits()
    max_waiting: int = 64  # admitted requests beyond the engine's running slots
    request_timeout_s: float = 600.0  # per request, enforced by the engine's scheduler
    retry_after_s: int = 1
    snapshot_interval_s: float = 0.25


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"request body is over the limit of {limit} bytes", code="body_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine, options: ServeOptions | None = None, runner: EngineRunner | None = None):
    opts = options or ServeOptions()
    runner = runner or EngineRunner(
        engine, opts.max_waiting, snapshot_interval_s=opts.snapshot_interval_s
    )
    models = (opts.model_name,)
    key = opts.api_key.encode() if opts.api_key else None

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.stop)

    app = FastAPI(
        title="kvscope", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.runner = runner
    app.state.options = opts

    # ------------------------------------------------------------ errors and auth
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return _error(APIError(400, "invalid request", code="invalid_value"))

    @app.exception_handler(Exception)
    async def _bug(request, e):  # a bug: one line in the body, never a traceback
        return _error(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

    if key is not None:
        app.add_middleware(BearerAuth, key=key)

    # ------------------------------------------------------------ info routes
    @app.get("/health")
    async def health():
        if runner.failed:
            return JSONResponse({"status": "error", "error": runner.failed}, status_code=503)
        return {"status": "ok", "in_flight": runner.in_flight, "capacity": runner.capacity}

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "kvscope"} for m in models]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        seq = runner.snapshot_seq
        runner.request_snapshot()
        deadline = time.monotonic() + 1.0  # a step boundary; else the last published one
        while runner.snapshot_seq == seq and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        text = prometheus_text(runner.snapshot, runner, engine)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/kvscope/v1/info")
    async def info():
        return engine.model_info()

    encoded: dict[int, bytes] = {}  # snapshot seq -> its SSE line, shared by all watchers

    async def _encoded(seq: int, snap) -> bytes:
        if seq not in encoded:  # JSON of a 4096-page snapshot: ~0.1 s, off the event loop
            line = await asyncio.to_thread(lambda: render.sse(json.dumps(asdict(snap))))
            encoded.clear()
            encoded[seq] = line
        return encoded[seq]

    @app.get("/kvscope/v1/snapshots")
    async def snapshots(request: Request, interval: float = 0.5, limit: int = 0):
        """Server-sent events: one JSON EngineSnapshot per new telemetry snapshot."""
        period = min(max(interval, 0.05), 10.0)

        async def stream():
            seq, sent = -1, 0
            runner.want_snapshots(2 * period + 1)
            if limit:
                runner.request_snapshot()
            while not await request.is_disconnected():
                runner.want_snapshots(2 * period + 1)
                if runner.snapshot_seq != seq:
                    seq, snap = runner.snapshot_seq, runner.snapshot
                    yield await _encoded(seq, snap)
                    sent += 1
                    if limit and sent >= limit:
                        return
                await asyncio.sleep(period)

        return StreamingResponse(stream(), media_type="text/event-stream")

    # ------------------------------------------------------------ generation
    def _submit(g: GenRequest) -> tuple[Ticket, bool]:
        params = SamplingParams(
            max_new_tokens=g.max_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
            stop=g.stop,
        )
        in_think = False
        if g.kind == "chat":
            tok = engine.tokenizer
            if tok is None:
                raise APIError(
                    400, "this model has no tokenizer; use /v1/completions with token ids"
                )
            try:
                text = tok.apply_chat_template(g.messages, tools=g.tools)
            except KvscopeError as e:
                raise APIError(400, str(e), param="messages") from None
            in_think = text.rstrip().endswith("<think>")  # the template opened the think block
            kw = {"prompt": text}
        elif g.prompt_ids is not None:
            kw = {"prompt_ids": g.prompt_ids}
        else:
            kw = {"prompt": g.prompt}
        kw.update(params=params, timeout_s=opts.request_timeout_s)
        try:
            return runner.admit(kw, prefix=g.kind), in_think
        except Overloaded:
            raise APIError(
                429,
                f"server busy: {runner.capacity} requests in flight; retry later",
                "rate_limit_error",
                code="server_busy",
                headers={"Retry-After": str(opts.retry_after_s)},
            ) from None
        except KvscopeError as e:
            raise APIError(503, str(e), "server_error") from None

    async def _items(ticket: Ticket):
        """The ticket's events until its Outcome or Failure (the engine enforces timeouts;
        this bound only guards against a stuck engine thread)."""
        deadline = time.monotonic() + opts.request_timeout_s + 30
        while True:
            left = deadline - time.monotonic()
            try:
                item = await asyncio.wait_for(ticket.queue.get(), max(left, 0.01))
            except TimeoutError:
                runner.abort(ticket, "timeout")
                yield Failure(504, "request timed out", "timeout")
                return
            if isinstance(item, Accepted):
                continue
            yield item
            if isinstance(item, Outcome | Failure):
                return

    def _end_error(o: Outcome) -> APIError | None:
        if o.finish_reason == "timeout":
            return APIError(504, "request timed out (--request-timeout)", "timeout", code="timeout")
        if o.finish_reason in ("abort", "error"):
            return APIError(503, f"request ended: {o.finish_reason}", "server_error")
        return None

    async def _collect(ticket: Ticket) -> tuple[str, Outcome]:
        parts = []
        async for item in _items(ticket):
            if isinstance(item, Failure):
                raise APIError(item.status, item.message, item.type)
            if isinstance(item, Outcome):
                err = _end_error(item)
                if err is not None:
                    raise err
                return "".join(parts), item
            parts.append(item.text)
        raise APIError(500, "request ended without an outcome", "server_error")

    async def _generate(request: Request, kind: str):
        body = parse_json(await _read_body(request, opts.limits.max_body_bytes), opts.limits)
        parse = parse_chat if kind == "chat" else parse_completion
        g = parse(body, models, opts.limits)
        ticket, in_think = _submit(g)
        env = render.Envelope(kind, opts.model_name)
        first = await ticket.queue.get()  # Accepted, or why the engine refused the request
        if isinstance(first, Failure):
            raise APIError(first.status, first.message, first.type)
        if g.stream:
            gen = _stream_chat if kind == "chat" else _stream_completion
            return StreamingResponse(
                _guarded(ticket, gen(ticket, env, g, in_think)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        watcher = asyncio.create_task(_watch_disconnect(request, ticket))
        try:
            text, o = await _collect(ticket)
        finally:
            watcher.cancel()
            runner.abort(ticket)  # no-op once finished
        if kind == "completion":
            choice = {"text": text, "logprobs": None, "finish_reason": render.finish_reason(o)}
            return env.reply(choice, o, ticket.request_id)
        parsed = parse_reply(text, in_think)
        msg = {"role": "assistant", "content": parsed.content}
        if parsed.reasoning is not None:
            msg["reasoning_content"] = parsed.reasoning
        if parsed.tool_calls:
            msg["tool_calls"] = [render.tool_call_json(c) for c in parsed.tool_calls]
        reason = render.finish_reason(o, bool(parsed.tool_calls))
        return env.reply({"message": msg, "finish_reason": reason}, o, ticket.request_id)

    async def _watch_disconnect(request: Request, ticket: Ticket) -> None:
        """A non-streamed request whose client went away is aborted too."""
        while not ticket.done:
            if await request.is_disconnected():
                runner.abort(ticket)
                return
            await asyncio.sleep(0.1)

    async def _guarded(ticket: Ticket, chunks):
        """Abort the request when the client goes away mid-stream (the response task is
        cancelled, or the generator closed): the engine reclaims its pages safely."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            runner.abort(ticket)

    def _final(env, g, ticket, o, reason, choice_end: dict):
        out = [render.sse(env.chunk({**choice_end, "finish_reason": reason}))]
        ext = render.extension(o, ticket.request_id)
        if g.include_usage:
            out.append(render.sse(env.chunk(None, usage=render.usage(o), kvscope=ext)))
        else:
            out[0] = render.sse(env.chunk({**choice_end, "finish_reason": reason}, kvscope=ext))
        out.append(render.sse("[DONE]"))
        return out

    def _stream_error(status: int, message: str, type_: str) -> list[bytes]:
        return [render.sse(APIError(status, message, type_).body()), render.sse("[DONE]")]

    async def _stream_chat(ticket, env, g, in_think):
        parser = GlmParser(in_think)
        calls = 0
        started = False  # leading whitespace before any content is dropped (after </think>)
        yield render.sse(
            env.chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        )
        async for item in _items(ticket):
            if isinstance(item, Failure):
                for b in _stream_error(item.status, item.message, item.type):
                    yield b
                return
            pieces = parser.finish() if isinstance(item, Outcome) else parser.feed(item.text)
            for p in pieces:
                if p.kind == "tool_call":
                    delta = {"tool_calls": [render.tool_call_json(p.call, calls)]}
                    calls += 1
                elif p.kind == "reasoning":
                    delta = {"reasoning_content": p.text}
                else:
                    text = p.text if started else p.text.lstrip()
                    if not text:
                        continue
                    started = True
                    delta = {"content": text}
                yield render.sse(env.chunk({"delta": delta, "finish_reason": None}))
            if isinstance(item, Outcome):
                err = _end_error(item)
                if err is not None:
                    for b in _stream_error(err.status, err.message, err.type):
                        yield b
                    return
                for b in _final(
                    env, g, ticket, item, render.finish_reason(item, calls > 0), {"delta": {}}
                ):
                    yield b

    async def _stream_completion(ticket, env, g, in_think):
        async for item in _items(ticket):
            if isinstance(item, Failure):
                for b in _stream_error(item.status, item.message, item.type):
                    yield b
                return
            if isinstance(item, Outcome):
                err = _end_error(item)
                if err is not None:
                    for b in _stream_error(err.status, err.message, err.type):
                        yield b
                    return
                end = {"text": "", "logprobs": None}
                for b in _final(env, g, ticket, item, render.finish_reason(item), end):
                    yield b
            elif item.text:
                yield render.sse(
                    env.chunk({"text": item.text, "logprobs": None, "finish_reason": None})
                )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, "completion")

    return app


class BearerAuth:
    """Pure ASGI middleware (streams and disconnects pass through untouched): every path but
    /health needs `Authorization: Bearer <key>`, compared in constant time."""

    def __init__(self, app, key: bytes):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        err = APIError(
            401,
            "missing or wrong API key; send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="invalid_api_key",
        )
        await _error(err)(scope, receive, send)
