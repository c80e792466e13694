"""Immutable telemetry snapshots: what the engine shows the outside world.

`Engine.snapshot()` returns an `EngineSnapshot`; the inspector polls it (~10 Hz) from the UI
thread. Snapshots are plain frozen dataclasses of ints/strings/tuples: no tensors, no references
into live engine state, so a reader can never observe a half-updated structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Page states of the L1 page life cycle (see docs/architecture.md).
PAGE_STATES = ("FREE", "WRITING", "READY", "CACHED", "DRAINING", "LOADING")
TIERS = ("L1", "L2", "L3")
VERDICTS = ("ok", "suspect", "corrupt")


@dataclass(frozen=True)
class TierUsage:
    """Occupancy of one KV tier."""

    tier: str  # "L1" | "L2" | "L3"
    pages_used: int
    pages_total: int
    bytes_used: int
    bytes_total: int


@dataclass(frozen=True)
class PageInfo:
    """One L1 page slot."""

    slot: int
    state: str  # one of PAGE_STATES
    owners: tuple[str, ...]  # request ids holding a reference (shared prefix: several)
    epoch: int
    tokens: int  # token slots filled
    checksum: str | None  # hex digest of the latent/K plane once written, else None
    tiers: tuple[str, ...]  # tiers holding a copy of this page ("L1", "L2", "L3")


@dataclass(frozen=True)
class RequestInfo:
    request_id: str
    status: str  # "waiting" | "prefill" | "decode" | "finished" | "aborted" | "error"
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: dict[str, int]  # by tier
    pages: int
    ttft_s: float | None
    tok_per_s: float | None
    verdict: str  # one of VERDICTS, worst so far
    # Speculative decoding: mean tokens per verify step and share of drafts accepted (None
    # when the request verified no drafts).
    accept_length: float | None = None
    accept_rate: float | None = None


@dataclass(frozen=True)
class IntegrityEvent:
    """A violation, injected fault or recovery, for the integrity log."""

    time_s: float
    request_id: str
    kind: str  # e.g. "epoch", "fence", "checksum", "shadow", "anomaly", "inject", "recovery"
    detail: str
    pages: tuple[int, ...] = ()


@dataclass(frozen=True)
class RadixSummary:
    nodes: int
    cached_tokens: int
    longest_prefixes: tuple[tuple[int, str], ...]  # (tokens, preview text or ids)
    hits_by_tier: dict[str, int]


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything the inspector draws, captured at one instant."""

    time_s: float  # monotonic seconds since engine start
    model: str  # model name / path
    arch: str  # "glm_moe_dsa" | "glm4_moe"
    device: str
    page_size: int
    tiers: tuple[TierUsage, ...]
    pages: tuple[PageInfo, ...]  # every L1 slot, in slot order
    requests: tuple[RequestInfo, ...]
    radix: RadixSummary
    transfers_in_flight: int = 0
    evictions: int = 0
    drained_pages: int = 0
    decode_tok_per_s: float = 0.0
    prefill_tok_per_s: float = 0.0
    tokens_generated: int = 0
    integrity_events: tuple[IntegrityEvent, ...] = ()
    # Expert cache heat: layer -> tuple of hit counts per expert (empty when not offloading).
    expert_heat: tuple[tuple[int, ...], ...] = ()
    # LayerSplit: rank -> owned layer ids (empty when not split).
    layer_owners: tuple[tuple[int, ...], ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenVerdict:
    """Integrity verdict of one emitted token (see docs/integrity.md)."""

    verdict: str = "ok"  # one of VERDICTS
    reasons: tuple[str, ...] = ()
    pages: tuple[int, ...] = ()  # L1 slots read to produce this token
    epochs_ok: bool = True
    fences_ok: bool = True
    checksums_verified: int = 0  # page planes whose checksum was verified for this token
    shadow: tuple[bool, float] | None = None  # (top-1 agrees, max |delta logit|) when sampled
    # Speculative decoding (runtime/speculative.py): "" without it; "accepted" for an MTP draft
    # the target model accepted; "target" for the target's own token of a verify step, after
    # `rejected` drafts it rejected (0 when every draft was accepted: the bonus token).
    draft: str = ""
    rejected: int = 0


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token of one request, as `Engine.step()` returns them."""

    request_id: str
    index: int  # 0-based position among the request's generated tokens
    token_id: int
    text: str  # decoded text delta this token adds (may be "" for partial UTF-8)
    verdict: TokenVerdict
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "timeout" | "error"
