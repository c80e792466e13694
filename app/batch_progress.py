"""Progress bar and end summary for `kvscope batch` (plain text on stderr; no Textual, no torch).

    with BatchProgress(total_requests=len(lines)) as progress:
        for event in stream:                      # as tokens come out of engine.step()
            progress.add_tokens(1)
        ...
        progress.request_done(prompt_tokens=.., completion_tokens=.., cached_tokens={"L1": ..},
                              verdict="ok", violations=0)
        progress.request_failed()                 # for an {"id", "error"} output line
    # leaving the block prints the summary; `progress.summary()` gives it as a dict

On a terminal the bar redraws in place (at most every `min_interval` s); when stderr is not a
terminal (CI logs) it prints one line every `log_interval` s instead.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from runtime.telemetry import TIERS, VERDICTS


def _n(x: int) -> str:
    return f"{x:,}"


def _clock_text(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class BatchProgress:
    def __init__(
        self,
        total_requests: int,
        *,
        stream: TextIO | None = None,
        width: int = 24,
        min_interval: float = 0.1,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        assert total_requests >= 0
        self.total = total_requests
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval = min_interval
        self.log_interval = log_interval
        self.clock = clock
        self.tty = self.stream.isatty() if tty is None else tty
        self.done = 0
        self.errors = 0
        self.tokens = 0  # completion tokens streamed so far
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached = dict.fromkeys(TIERS, 0)
        self.verdicts: Counter[str] = Counter(dict.fromkeys(VERDICTS, 0))
        self.violations = 0
        self.start = clock()
        self._last_draw = float("-inf")
        self._closed = False

    # --------------------------------------------------------------- counts
    def add_tokens(self, n: int = 1) -> None:
        self.tokens += n
        self._maybe_draw()

    def request_done(
        self,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: dict[str, int] | None = None,
        verdict: str = "ok",
        violations: int = 0,
    ) -> None:
        self.done += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        for tier, n in (cached_tokens or {}).items():
            self.cached[tier] = self.cached.get(tier, 0) + n
        self.verdicts[verdict] += 1
        self.violations += violations
        self._maybe_draw(force=self.done + self.errors == self.total)

    def request_failed(self) -> None:
        self.errors += 1
        self._maybe_draw(force=self.done + self.errors == self.total)

    # --------------------------------------------------------------- output
    def elapsed(self) -> float:
        return max(0.0, self.clock() - self.start)

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def bar_line(self) -> str:
        finished = self.done + self.errors
        frac = finished / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "█" * filled + "░" * (self.width - filled)
        eta = ""
        if 0 < finished < self.total:
            eta = f"  ETA {_clock_text(self.elapsed() / finished * (self.total - finished))}"
        verdicts = " ".join(f"{v} {self.verdicts[v]}" for v in VERDICTS)
        errors = f"  errors {self.errors}" if self.errors else ""
        return (
            f"batch {bar} {finished}/{self.total} req  {_n(self.tokens)} tok  "
            f"{self.rate():.1f} tok/s  {verdicts}{errors}  {_clock_text(self.elapsed())}{eta}"
        )

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.total,
            "completed": self.done,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": dict(self.cached),
            "verdicts": {v: self.verdicts[v] for v in VERDICTS},
            "violations": self.violations,
            "seconds": round(self.elapsed(), 3),
            "tok_per_s": round(self.rate(), 3),
        }

    def summary_text(self) -> str:
        cached = sum(self.cached.values())
        share = (
            f" ({100 * cached / self.prompt_tokens:.1f}% of prompt)" if self.prompt_tokens else ""
        )
        lines = [
            f"kvscope batch: {self.total} requests, {self.done} done, {self.errors} errors "
            f"in {self.elapsed():.1f} s",
            f"  tokens: prompt {_n(self.prompt_tokens)} · completion "
            f"{_n(self.completion_tokens)} · {self.rate():.1f} tok/s",
            "  cached prompt tokens: "
            + " · ".join(f"{t} {_n(n)}" for t, n in self.cached.items())
            + share,
            "  integrity: "
            + " · ".join(f"{v} {self.verdicts[v]}" for v in VERDICTS)
            + f" · violations {self.violations}",
        ]
        return "\n".join(lines)

    def draw(self) -> None:
        line = self.bar_line()
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_draw = self.clock()

    def close(self) -> str:
        """Draw the final bar, print the summary (once) and return it."""
        text = self.summary_text()
        if not self._closed:
            self._closed = True
            self.draw()
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()
        return text

    def __enter__(self) -> BatchProgress:
        self.draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _maybe_draw(self, force: bool = False) -> None:
        interval = self.min_interval if self.tty else self.log_interval
        if (force and self.tty) or self.clock() - self._last_draw >= interval:
            self.draw()
