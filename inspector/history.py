"""TelemetryHistory: bounded time series derived from polled snapshots, for the charts.

A point is recorded only when the engine clock (`snapshot.time_s`) moved, so polling an idle or
paused engine adds nothing and a deterministic engine yields deterministic charts.
"""

from __future__ import annotations

from collections import deque

from runtime.telemetry import TIERS, EngineSnapshot


class TelemetryHistory:
    def __init__(self, maxlen: int = 600) -> None:
        self.maxlen = maxlen
        self.time: deque[float] = deque(maxlen=maxlen)
        self.tier_pct: dict[str, deque[float]] = {t: deque(maxlen=maxlen) for t in TIERS}
        self.decode_tps: deque[float] = deque(maxlen=maxlen)
        self.prefill_tps: deque[float] = deque(maxlen=maxlen)
        self.ttft: dict[str, tuple[float, float]] = {}  # request id -> (time seen, ttft_s)

    def __len__(self) -> int:
        return len(self.time)

    def add(self, snap: EngineSnapshot) -> bool:
        """Record `snap`; return False when the engine clock has not moved since the last one."""
        if self.time and snap.time_s == self.time[-1]:
            return False
        self.time.append(snap.time_s)
        by_tier = {t.tier: t for t in snap.tiers}
        for name, series in self.tier_pct.items():
            usage = by_tier.get(name)
            series.append(
                100.0 * usage.pages_used / usage.pages_total if usage and usage.pages_total else 0.0
            )
        self.decode_tps.append(snap.decode_tok_per_s)
        self.prefill_tps.append(snap.prefill_tok_per_s)
        for req in snap.requests:
            if req.ttft_s is not None and req.request_id not in self.ttft:
                self.ttft[req.request_id] = (snap.time_s, req.ttft_s)
        while len(self.ttft) > self.maxlen:
            del self.ttft[next(iter(self.ttft))]
        return True
