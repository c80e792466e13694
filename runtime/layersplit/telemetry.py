"""Per-rank LayerSplit telemetry (plain ints/floats/tuples/dicts: safe to pickle, snapshot and
write as JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RankTelemetry:
    rank: int
    owned_layers: tuple[int, ...]
    kv_bytes: dict[str, int]  # by tier: L1 / L2 pools as allocated, L3 files' plane bytes
    bcast_bytes_sent: int  # plane rows this rank broadcast as a layer's owner
    bcast_bytes_recv: int  # plane rows this rank received from owners' broadcasts
    bcast_time_s: float  # time spent waiting on broadcasts (after the overlapped compute)
    bcast_buffer_peak: int  # largest broadcast receive buffer held at once (bytes)
    gather_bytes_sent: int  # new plane rows sent to a layer's owner (prefill)
    gather_bytes_recv: int  # new plane rows received as owner (prefill)
    hop_bytes: int  # decode hidden states (+ DSA selections) sent to the next layer's owner
    hops: int  # decode hops sent (one per ownership change per step, whatever the batch)
    prefill_tokens: int  # positions this rank computed in context-parallel prefill
    decode_layers: int  # layer steps this rank ran for decode (one per owned layer per step)
    kv_pages: dict[str, int] = field(default_factory=dict)  # L1/L2 slots, L3 files
    kv_bytes_used: dict[str, int] = field(default_factory=dict)  # pages in use, by tier
    cached_pages: dict[str, int] = field(default_factory=dict)  # reused pages by serving tier
    decode_steps: int = 0
    decode_tokens: int = 0  # sum of the batch sizes of the decode steps
    max_batch: int = 0  # largest decode batch
    aborts: int = 0  # sequences aborted or timed out
    pages_drained: int = 0  # private pages of aborted sequences held DRAINING for the acks
    pages_acked: int = 0  # of them, released after every rank acked
    agree_rounds: int = 0  # agreement all-reduces (prefix, room, timeouts, acks)
    agree_time_s: float = 0.0
    load_failures: int = 0  # L2 -> L1 loads that failed their checksum (recomputed)
    disk_rejected: int = 0  # L3 files rejected (damaged, truncated, foreign): misses

    def as_dict(self) -> dict:
        d = asdict(self)
        d["owned_layers"] = list(self.owned_layers)
        return d


def layer_owners(telemetry: list[RankTelemetry]) -> tuple[tuple[int, ...], ...]:
    """rank -> owned layer ids, the shape EngineSnapshot.layer_owners takes."""
    return tuple(t.owned_layers for t in sorted(telemetry, key=lambda t: t.rank))
