"""Per-token verdicts (`ok | suspect | corrupt`) and their per-request summary."""

from __future__ import annotations

from runtime.integrity.anomaly import runaway_repetition, unexpected_chars
from runtime.telemetry import TokenVerdict

RANK = {"ok": 0, "suspect": 1, "corrupt": 2}


def worst(a: str, b: str) -> str:
    return a if RANK[a] >= RANK[b] else b


def token_verdict(
    rid: str, checks, shadow: tuple[bool, float] | None, protected: bool, shadow_tol: float
) -> TokenVerdict:
    """The verdict of a token of request `rid` produced by a step whose reads passed
    validation (`checks`: the step's StepChecks; `shadow`: its shadow result, if checked)."""
    reasons: list[str] = []
    verdict = "ok"
    if not protected:
        reasons.append("protections off (--unsafe): reads not validated")
    if shadow is not None and (not shadow[0] or shadow[1] > shadow_tol):
        verdict, reasons = "corrupt", reasons + ["shadow recompute disagrees"]
    pages = checks.pages.get(rid, ())
    return TokenVerdict(
        verdict=verdict,
        reasons=tuple(reasons),
        pages=tuple(pages),
        epochs_ok=protected,
        fences_ok=protected,
        checksums_verified=checks.checksums.get(rid, 0),
        shadow=shadow,
    )


def apply_text_checks(req, verdict: TokenVerdict, prompt_text: str) -> TokenVerdict:
    """Runaway repetition / unexpected characters mark the token `suspect`; update the
    request summary (worst verdict, checked tokens)."""
    reasons = list(verdict.reasons)
    v = verdict.verdict
    if runaway_repetition(req.output_ids):
        reasons.append("runaway repetition")
        v = worst(v, "suspect")
    odd = unexpected_chars(prompt_text, req.text[-16:])
    if odd:
        reasons.append(f"unexpected characters {''.join(sorted(set(odd)))!r}")
        v = worst(v, "suspect")
    if verdict.epochs_ok:
        req.checked_tokens += 1
    req.verdict = worst(req.verdict, v)
    if v != verdict.verdict or reasons != list(verdict.reasons):
        from dataclasses import replace

        return replace(verdict, verdict=v, reasons=tuple(reasons))
    return verdict
