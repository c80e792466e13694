"""Text anomaly signals: runaway repetition and characters from unexpected scripts.

Both mark a token `suspect` (never `corrupt`): they are hints that garbling may have happened,
as in the GLM-5 incident reports (odd symbols, repetition, stray characters).
"""

from __future__ import annotations

import functools
import unicodedata

MAX_PERIOD = 4  # token n-grams of length 1..4
MIN_REPEATS = 12  # repeated back to back this many times = runaway repetition


def runaway_repetition(tokens: list[int]) -> bool:
    """True when the tail is one short n-gram repeated MIN_REPEATS times back to back."""
    for p in range(1, MAX_PERIOD + 1):
        n = p * MIN_REPEATS
        if len(tokens) < n:
            continue
        tail = tokens[-n:]
        if all(tail[i] == tail[i % p] for i in range(n)):
            return True
    return False


def _script(ch: str) -> str:
    if ch.isascii():
        return "ascii"
    try:
        name = unicodedata.name(ch)
    except ValueError:
        return "unnamed"
    return name.split(" ")[0]  # e.g. LATIN, CYRILLIC, CJK, HANGUL, ARABIC


_ALWAYS = frozenset(
    {"ascii", "LATIN", "GREEK", "EM", "EN", "LEFT", "RIGHT", "HORIZONTAL", "BULLET"}
)


@functools.lru_cache(maxsize=256)
def allowed_scripts(prompt: str) -> frozenset[str]:
    """Scripts a reply to `prompt` may use (computed once per prompt, checked every token)."""
    return _ALWAYS | {_script(c) for c in set(prompt)}


def unexpected_chars(prompt: str, text: str) -> list[str]:
    """Characters of `text` whose script appears neither in the prompt nor in plain ASCII
    (plus Latin and common punctuation). Control characters other than whitespace count."""
    allowed = allowed_scripts(prompt)
    bad = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cc" and ch not in "\n\t\r":
            bad.append(ch)
        elif cat in ("Co", "Cn", "Cs") or ch == "\ufffd":
            bad.append(ch)
        elif _script(ch) not in allowed:
            bad.append(ch)
    return bad
