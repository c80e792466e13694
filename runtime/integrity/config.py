"""Integrity settings and the `--inject KIND[:RATE]` grammar."""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.errors import KvscopeError

FAULT_KINDS = ("abort-reuse", "skip-fence", "host-bitflip", "disk-corrupt")
# The detectors that can catch an injected fault, as `kvscope chaos` reports them (one column
# each, in this order): epoch/owner checks and late-write acks, fence checks at the read, page
# checksums (sampled re-hash, load-back verification, L3 file verification), shadow recompute,
# and the speculative acceptance detector (runtime/integrity/acceptance.py; MTP models only).
DETECTORS = ("epoch", "fence", "checksum", "shadow", "acceptance")
DEFAULT_RATES = {"abort-reuse": 0.05, "skip-fence": 0.5, "host-bitflip": 0.05, "disk-corrupt": 0.2}


@dataclass(frozen=True)
class IntegrityConfig:
    protections: bool = True  # False = --unsafe: no drain, no fence waits, no checksums
    bypass_drain: bool = False  # injection aid: reuse pages at once, but keep detection on
    checksum_sample: float = 0.02  # share of steps that re-verify one full page a batch reads
    shadow_rate: float = 0.005  # share of tokens recomputed without the cache
    shadow_tol: float = 1e-3  # max |delta logit| (fp32); bf16/fp16 use 5e-2
    # A shadow recompute is a whole prefill of the context, so its cost grows with the context:
    # sampled shadows are skipped while they have taken more than this share of the engine's
    # step time (None: no cap). shadow_rate 1.0 (every token) is never capped.
    shadow_budget: float | None = 0.03
    # The speculative acceptance detector (runtime/integrity/acceptance.py): the incident's
    # thresholds, judged over the last accept_window verify steps once a request has
    # generated accept_after_tokens tokens.
    accept_min_length: float = 1.4
    accept_max_rate: float = 0.96
    accept_after_tokens: int = 128
    accept_window: int = 64
    faults: dict[str, float] = field(default_factory=dict)  # kind -> rate
    seed: int = 0


def parse_inject(specs: list[str]) -> dict[str, float]:
    """['abort-reuse', 'skip-fence:0.2'] -> {kind: rate}; one-line KvscopeError otherwise."""
    out: dict[str, float] = {}
    for spec in specs:
        kind, _, rate = spec.partition(":")
        if kind not in FAULT_KINDS:
            raise KvscopeError(f"--inject {spec}: unknown kind; choose {', '.join(FAULT_KINDS)}")
        try:
            r = float(rate) if rate else DEFAULT_RATES[kind]
        except ValueError:
            raise KvscopeError(f"--inject {spec}: RATE must be a number in (0, 1]") from None
        if not 0 < r <= 1:
            raise KvscopeError(f"--inject {spec}: RATE must be in (0, 1]")
        out[kind] = r
    return out
