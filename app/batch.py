"""`kvscope batch`: JSONL in, JSONL out, written incrementally; nothing is lost.

Every input line yields exactly one output line: a result record or `{"id", "error"}`.
Results are written (and flushed) as each request finishes, so a crash loses nothing already
produced. Malformed lines become error records and the rest go on.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.engine import Engine
from runtime.errors import KvscopeError
from runtime.sampling import SamplingParams

FIELDS = {"id", "prompt", "messages", "prompt_ids", "max_new_tokens", "temperature"}
FIELDS |= {"top_p", "top_k", "seed", "stop"}


def _params(rec: dict, defaults: dict) -> SamplingParams:
    stop = rec.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise KvscopeError("'stop' must be a string or a list of strings")
    kw = {k: rec.get(k, defaults.get(k)) for k in ("max_new_tokens", "temperature", "seed")}
    kw["top_p"] = rec.get("top_p", 1.0)
    kw["top_k"] = rec.get("top_k", 0)
    for k in ("max_new_tokens", "top_k", "seed"):
        if kw[k] is not None and (not isinstance(kw[k], int) or isinstance(kw[k], bool)):
            raise KvscopeError(f"'{k}' must be an integer")
    for k in ("temperature", "top_p"):
        if not isinstance(kw[k], int | float) or isinstance(kw[k], bool):
            raise KvscopeError(f"'{k}' must be a number")
    return SamplingParams(stop=tuple(stop), **kw).validate()


def result_record(engine: Engine, rid: str, user_id) -> dict:
    req = engine.request(rid)
    if req.status == "error":
        return {"id": user_id, "error": "; ".join(req.violations) or "request failed"}
    return {
        "id": user_id,
        "text": req.text,
        "token_ids": list(req.output_ids),
        "finish_reason": req.finish_reason,
        "usage": {
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": dict(req.cached_tokens),
        },
        "integrity": {
            "verdict": req.verdict,
            "checked_tokens": req.checked_tokens,
            "violations": list(req.violations),
        },
    }


def count_requests(inp: Path) -> int:
    try:
        with inp.open(encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise KvscopeError(f"--input {inp}: cannot read ({e.strerror})") from None


def run_batch(engine: Engine, inp: Path, out: Path, defaults: dict, progress=None) -> dict:
    """Process every line of `inp`; returns summary counts. `progress` (optional) follows
    app.batch_progress.BatchProgress: add_tokens / request_done / request_failed."""
    try:
        src = inp.open(encoding="utf-8")
    except OSError as e:
        raise KvscopeError(f"--input {inp}: cannot read ({e.strerror})") from None
    try:
        dst = out.open("w", encoding="utf-8")
    except OSError as e:
        raise KvscopeError(f"--output {out}: cannot write ({e.strerror})") from None
    summary = {"requests": 0, "errors": 0, "tokens": 0, "corrupt": 0}
    summary["cached"] = {"L1": 0, "L2": 0, "L3": 0}
    pending: dict[str, object] = {}  # engine request id -> user id
    window = 4 * engine.config.max_running

    def write(rec: dict) -> None:
        dst.write(json.dumps(rec, ensure_ascii=False) + "\n")
        dst.flush()
        summary["requests"] += 1
        if "error" in rec:
            summary["errors"] += 1
        else:
            summary["tokens"] += rec["usage"]["completion_tokens"]
            for t, n in rec["usage"]["cached_tokens"].items():
                summary["cached"][t] += n
            found = rec["integrity"]["verdict"] == "corrupt" or rec["integrity"]["violations"]
            summary["corrupt"] += bool(found)  # corruption found (even if recovered)
        if progress is not None:
            if "error" in rec:
                progress.request_failed()
            else:
                u = rec["usage"]
                progress.request_done(
                    prompt_tokens=u["prompt_tokens"],
                    completion_tokens=u["completion_tokens"],
                    cached_tokens=u["cached_tokens"],
                    verdict=rec["integrity"]["verdict"],
                    violations=len(rec["integrity"]["violations"]),
                )

    def drain(until: int) -> None:
        while len(pending) > until:
            for ev in engine.step():
                if progress is not None and ev.request_id in pending and ev.token_id >= 0:
                    progress.add_tokens(1)
                if ev.finished and ev.request_id in pending:
                    write(result_record(engine, ev.request_id, pending.pop(ev.request_id)))

    with src, dst:
        for lineno, line in enumerate(src, 1):
            if not line.strip():
                continue
            user_id = f"line-{lineno}"
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise KvscopeError("line is not a JSON object")
                user_id = rec.get("id", user_id)
                unknown = set(rec) - FIELDS
                if unknown:
                    raise KvscopeError(f"unknown field '{sorted(unknown)[0]}'")
                rid = engine.submit(
                    rec.get("prompt"),
                    messages=rec.get("messages"),
                    prompt_ids=rec.get("prompt_ids"),
                    params=_params(rec, defaults),
                    request_id=f"{lineno}",
                )
                pending[rid] = user_id
            except json.JSONDecodeError as e:
                write({"id": user_id, "error": f"{inp}:{lineno}: malformed JSON ({e.msg})"})
            except KvscopeError as e:
                write({"id": user_id, "error": f"{inp}:{lineno}: {e}"})
            drain(window)
        drain(0)
    return summary
