"""`kvscope batch`: JSONL in, JSONL out, written incrementally; nothing is lost.

Every input line yields exactly one output line: a result record or `{"id", "error"}`.
Results are written (and flushed) as each request finishes, so a crash loses nothing already
produced. Malformed lines become error records and the rest go on.
"""

from __future__ import annotations

from pathlib import Path

from app.jsonl import FIELDS, complete_ids, count_requests, json_line, read_requests
from app.speculation import AcceptanceFlags, speculation_record
from runtime.engine import Engine
from runtime.errors import KvscopeError
from runtime.sampling import SamplingParams

__all__ = ["FIELDS", "count_requests", "json_line", "result_record", "run_batch"]


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


def result_record(engine: Engine, rid: str, user_id, flags: AcceptanceFlags | None = None) -> dict:
    req = engine.request(rid)
    acceptance = flags.record(engine, req) if flags is not None else None
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
            "acceptance": acceptance,
        },
        "speculation": speculation_record(req),
    }


def run_batch(
    engine: Engine,
    inp: Path,
    out: Path,
    defaults: dict,
    progress=None,
    stop=None,
    resume: bool = False,
) -> dict:
    """Process every line of `inp`; returns summary counts. `progress` (optional) follows
    app.batch_progress.BatchProgress: add_tokens / request_done / request_failed.

    ``stop`` (app.shutdown.Stop, optional): once a signal came, no line is admitted any more,
    the requests in flight are aborted through Engine.abort (safe reclaim) and get no output
    line, so that ``resume`` runs them again. ``resume``: ids that already have a complete line
    in `out` are skipped (a torn last line is cut off first) and new lines are appended."""
    done = complete_ids(out) if resume else set()
    lines = read_requests(inp)  # raises a one-line error if the file cannot be read
    try:
        dst = out.open("a" if resume else "w", encoding="utf-8")
    except OSError as e:
        raise KvscopeError(f"--output {out}: cannot write ({e.strerror})") from None
    summary = {"requests": 0, "errors": 0, "tokens": 0, "corrupt": 0, "skipped": 0}
    summary["cached"] = {"L1": 0, "L2": 0, "L3": 0}
    summary["interrupted"] = False
    pending: dict[str, object] = {}  # engine request id -> user id
    window = 4 * engine.config.max_running
    flags = AcceptanceFlags()

    def stopping() -> bool:
        return stop is not None and stop.requested

    def write(rec: dict) -> None:
        dst.write(json_line(rec))
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
        while len(pending) > until and not stopping():
            for ev in engine.step():
                if progress is not None and ev.request_id in pending and ev.token_id >= 0:
                    progress.add_tokens(1)
                flags.note(ev)
                if ev.finished and ev.request_id in pending:
                    uid = pending.pop(ev.request_id)
                    write(result_record(engine, ev.request_id, uid, flags))

    with dst:
        for line in lines:
            if stopping():
                break
            if line.key in done:
                summary["skipped"] += 1
                if progress is not None:  # done by an earlier run: not this run's work
                    progress.total -= 1
                continue
            if line.error is not None:
                write({"id": line.uid, "error": line.error})
                continue
            rec = line.rec
            try:
                rid = engine.submit(
                    rec.get("prompt"),
                    messages=rec.get("messages"),
                    prompt_ids=rec.get("prompt_ids"),
                    params=_params(rec, defaults),
                    request_id=f"{line.lineno}",
                )
                pending[rid] = line.uid
            except KvscopeError as e:
                write({"id": line.uid, "error": f"{inp}:{line.lineno}: {e}"})
            drain(window)
        drain(0)
        if stopping():  # abort what is in flight: no output line, --resume runs it again
            summary["interrupted"] = True
            for rid in list(pending):
                engine.abort(rid, "interrupted")
                pending.pop(rid)
    return summary
