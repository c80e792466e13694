"""Per-rank LayerSplit telemetry (plain ints/floats/tuples: safe to pickle and snapshot)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankTelemetry:
    rank: int
    owned_layers: tuple[int, ...]
    kv_bytes: dict[str, int]  # by tier; only "L1" in this mode (no HiCache tiers)
    bcast_bytes_sent: int  # plane rows this rank broadcast as a layer's owner
    bcast_bytes_recv: int  # plane rows this rank received from owners' broadcasts
    bcast_time_s: float  # time spent waiting on broadcasts (after the overlapped compute)
    bcast_buffer_peak: int  # largest broadcast receive buffer held at once (bytes)
    gather_bytes_sent: int  # new plane rows sent to a layer's owner (prefill)
    gather_bytes_recv: int  # new plane rows received as owner (prefill)
    hop_bytes: int  # decode hidden state (+ DSA selection) sent to the next layer's owner
    hops: int
    prefill_tokens: int  # tokens this rank computed in context-parallel prefill
    decode_layers: int  # layer steps this rank ran for decode tokens


def layer_owners(telemetry: list[RankTelemetry]) -> tuple[tuple[int, ...], ...]:
    """rank -> owned layer ids, the shape EngineSnapshot.layer_owners takes."""
    return tuple(t.owned_layers for t in sorted(telemetry, key=lambda t: t.rank))
