"""Speculative acceptance as an integrity signal (runtime/speculative.py).

The GLM-5 incident's production detector was the speculative acceptance itself: a request whose
drafts are rarely accepted (accept length < 1.4) is likely garbled, one whose drafts are almost
always accepted (accept rate > 0.96) is likely looping; both judged after 128 generated tokens.
A silent KV corruption (e.g. a HiCache load-back read before it landed) shows the same way: the
draft layer and the target read different histories and stop agreeing. The thresholds are
IntegrityConfig's ``accept_*`` fields; the judgement uses the request's last ``accept_window``
verify steps, so a corruption mid-request is not diluted by the good steps before it.
"""

from __future__ import annotations


def acceptance_flag(stats, generated: int, cfg) -> str | None:
    """The reason a request's recent acceptance looks wrong, or None. ``stats``: its
    AcceptStats (None without speculation); ``cfg``: the IntegrityConfig."""
    if stats is None or not stats.history or generated < cfg.accept_after_tokens:
        return None
    recent = stats.history[-cfg.accept_window :]
    steps = len(recent)
    drafted = sum(d for d, _ in recent)
    accepted = sum(a for _, a in recent)
    length = (accepted + steps) / steps
    if length < cfg.accept_min_length:
        return f"accept length {length:.2f} < {cfg.accept_min_length} (garbled output?)"
    if drafted and accepted / drafted > cfg.accept_max_rate:
        rate = accepted / drafted
        return f"accept rate {rate:.2f} > {cfg.accept_max_rate} (looping output?)"
    return None
