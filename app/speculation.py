"""Speculative decoding as the user-facing modes report it (batch records, serve replies and
metrics): a request's draft statistics and the acceptance detector's verdicts
(runtime/speculative.py, runtime/integrity/acceptance.py)."""

from __future__ import annotations

from runtime.integrity.acceptance import acceptance_flag

ACCEPTANCE_PREFIX = "acceptance: "  # the detector's token-verdict reasons (integrity monitor)


def speculation_record(req) -> dict | None:
    """The request's draft statistics (runtime/speculative.AcceptStats), None without drafts."""
    st = req.spec
    if st is None:
        return None
    return {
        "steps": st.steps,
        "drafted": st.drafted,
        "accepted": st.accepted,
        "accept_length": round(st.accept_length, 4),
        "accept_rate": round(st.accept_rate, 4),
    }


class AcceptanceFlags:
    """Per request, the acceptance detector's token verdicts seen in the stream: how many
    tokens it flagged and the first one's reason (the request's final judgement is computed
    at the end, since the finishing event carries no token reasons)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def note(self, ev) -> None:
        reasons = [r for r in ev.verdict.reasons if r.startswith(ACCEPTANCE_PREFIX)]
        if not reasons:
            return
        rec = self.seen.setdefault(ev.request_id, {"first_token": ev.index, "first": None})
        rec["first"] = rec["first"] or reasons[0][len(ACCEPTANCE_PREFIX) :]
        rec["flagged_tokens"] = rec.get("flagged_tokens", 0) + 1

    def record(self, engine, req) -> dict | None:
        """{first_token, first, flagged_tokens, final} or None when never flagged."""
        seen = self.seen.pop(req.request_id, None)
        final = acceptance_flag(req.spec, len(req.output_ids), engine.config.integrity)
        if seen is None and final is None:
            return None
        seen = seen or {"first_token": len(req.output_ids) - 1, "first": final}
        n = seen.get("flagged_tokens", 0)
        # the last token of a request that ran to its end streamed inside the finishing event
        # (no token reasons): it was judged as `final` is
        n += final is not None and req.finish_reason in ("stop", "length")
        return {**seen, "flagged_tokens": n, "final": final}
