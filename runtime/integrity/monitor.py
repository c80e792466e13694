"""IntegrityMonitor: validates every KV read of an engine step and recovers from bad pages.

Who may write a page: only the step that owns it (`step#N` writer, acked in commit) or a tier
copy (load-back writer, fenced per layer). What a reader checks, per step and sequence:
- epochs: every page's epoch captured at scheduling is still current, and the reader still
  owns it (invariant 3);
- fences: a page in LOADING is read only after its layer's fence completed (invariant 2) —
  checked at the moment of the read, inside the pool accessor;
- checksums: pages arriving from L2/L3 are verified by the tier controller; a sampled share
  of steps also re-hashes one full page the batch reads and compares it with its record;
- late writes: a writer that acks into an epoch newer than the one it began in landed in
  a page that meanwhile changed hands (the GLM-5 use-after-free) — its victims are detected.
A sequence that read untrusted bytes is discarded for the step (its token is never emitted),
the bad pages are invalidated in every tier, and it recomputes from its clean prefix.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import replace

import torch

from runtime.integrity.acceptance import acceptance_flag
from runtime.integrity.config import DETECTORS, IntegrityConfig
from runtime.integrity.faults import FaultInjector
from runtime.integrity.verdicts import apply_text_checks, token_verdict, worst
from runtime.kv.checksum import page_checksums
from runtime.step_hooks import StepChecks, StepHandles, StepHooks
from runtime.telemetry import IntegrityEvent, TokenVerdict


class IntegrityMonitor(StepHooks):
    """The integrity hook of an engine (runtime/step_hooks.py). It owns the fault injector
    (`faults`), a hook of its own that the engine runs first at every point."""

    def __init__(self, cfg: IntegrityConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.faults = FaultInjector(cfg, self)
        self.events: deque[IntegrityEvent] = deque(maxlen=1000)
        self.pending_bad: dict[str, list[str]] = defaultdict(list)
        self._checks: StepChecks | None = None  # the step whose forward is running
        self.kv: StepHandles | None = None
        self._tokenizer = None
        self._recompute: Callable[[list[int]], torch.Tensor] | None = None
        self._exact = True
        self.busy_s = 0.0  # engine step time (note_step), shadows included
        self.shadow_s = 0.0  # time spent in shadow recomputes
        self.shadow_runs = 0
        self.shadow_skipped = 0  # sampled but skipped: over shadow_budget

    def attach(
        self,
        kv: StepHandles,
        tokenizer=None,
        recompute: Callable[[list[int]], torch.Tensor] | None = None,
        exact: bool = True,
    ) -> None:
        """Take the engine's KV handles and install the read guard in the L1 pool accessor
        (replacing the plain fence wait). `recompute(tokens)` -> next-token logits [V] without
        the cache (the shadow check); `exact`: fp32 model (tight shadow tolerance)."""
        self.kv, self._tokenizer, self._recompute, self._exact = kv, tokenizer, recompute, exact
        self.faults.attach(kv)
        kv.pool.read_guard = self.read_guard
        self._t0 = time.monotonic()

    def event(self, rid: str, kind: str, detail: str, pages=(), credit: bool = True) -> None:
        """Log an event; a detector's event (kind in DETECTORS, unless ``credit`` is False)
        also credits the injected faults that touched these pages or this request
        (runtime/integrity/ledger.py)."""
        self.events.append(
            IntegrityEvent(time.monotonic() - self._t0, rid, kind, detail, tuple(pages))
        )
        if kind in DETECTORS and credit:
            self.faults.ledger.flagged(kind, self.faults.step, pages, (rid,))

    # ---- inside the forward: every read goes through here -----------------------------------
    def read_guard(self, layer: int, plane: str, rows: torch.Tensor) -> None:
        tiers = self.kv.tiers
        if not tiers.loads_in_flight():
            return
        slots = torch.unique(rows // self.kv.page_size).tolist()
        # injected skip-fence: these slots' fences are not waited for (the incident's bug 2)
        skipped = self.faults.fence_reads(layer, plane, rows, slots)
        if not self.cfg.protections:
            return  # --unsafe: no fence waits at all
        tiers.wait_layer([s for s in slots if s not in skipped], layer)
        # Validation: was every fence of this layer complete at the moment of the read?
        open_ = [s for s in skipped if not tiers.fence_done(s, layer)]
        # straight into the running step's checks: before any late write's reason
        bad = self._checks.bad if self._checks is not None else self.pending_bad
        for slot in open_:
            for rid in self.kv.alloc.records[slot].owners:
                bad[rid].append(f"read {plane} L{layer} before its fence")
                self.event(rid, "fence", f"{plane} layer {layer} read before fence", [slot])

    # ---- around the forward -----------------------------------------------------------------
    def before_forward(self, batch, checks: StepChecks) -> None:
        alloc, bad = self.kv.alloc, checks.bad
        self._checks = checks
        for w in batch.seqs:
            rid = w.request_id
            if rid in self.pending_bad:
                bad[rid] += self.pending_bad.pop(rid)
            if not self.cfg.protections:
                continue
            for slot, ep in zip(w.page_table, w.epochs, strict=True):
                if not alloc.validate(slot, ep, rid):
                    bad[rid].append(f"page {slot} epoch/owner changed")
                    self.event(rid, "epoch", f"page {slot} epoch or owner changed", [slot])

    def after_forward(self, batch, checks: StepChecks) -> None:
        """Runs after the injector's (which lands late writes): re-hash a sampled page, then
        invalidate every untrusted page in every tier."""
        self._checks = None
        if self.cfg.protections and self.rng.random() < self.cfg.checksum_sample:
            self._sample_checksum(batch, checks)
        if checks.bad_slots:
            self.kv.tiers.invalidate(sorted(checks.bad_slots))

    def recovered(self, rid: str, reasons: list[str]) -> None:
        self.event(rid, "recovery", "step discarded and recomputed")

    def _sample_checksum(self, batch, checks: StepChecks) -> None:
        alloc, pool = self.kv.alloc, self.kv.pool
        candidates = [
            (w.request_id, s)
            for w in batch.seqs
            for s in w.page_table
            if alloc.records[s].checksums and alloc.records[s].state.value in ("READY", "CACHED")
        ]
        if not candidates:
            return
        rid, slot = self.rng.choice(candidates)
        want = alloc.records[slot].checksums
        have = page_checksums(pool.planes, [slot])[0]
        checks.checksums[rid] = checks.checksums.get(rid, 0) + len(have)
        if have != want:
            checks.bad_slots.add(slot)
            for owner in alloc.records[slot].owners:
                checks.bad[owner].append(f"page {slot} checksum mismatch")
                self.event(owner, "checksum", f"page {slot} bytes changed in L1", [slot])

    # ---- verdicts --------------------------------------------------------------------------------
    def verdict(self, rid: str, checks: StepChecks, shadow) -> TokenVerdict:
        """The verdict of a token of `rid` produced by a step whose reads passed validation."""
        return token_verdict(rid, checks, shadow, self.cfg.protections, self.shadow_tolerance())

    def text_checks(self, req, verdict: TokenVerdict) -> TokenVerdict:
        """Once the token is in the request's text: repetition / unexpected characters."""
        tok = self._tokenizer
        if not hasattr(req, "_prompt_text"):
            req._prompt_text = tok.decode(req.prompt_ids) if tok is not None else ""
        reason = acceptance_flag(req.spec, len(req.output_ids), self.cfg)
        if reason is not None:  # the speculative acceptance detector: a kind of its own
            if not getattr(req, "_acceptance_flagged", False):
                req._acceptance_flagged = True
                # a garbled-looking request (drafts keep failing) points at the KV the target
                # read; a looping one at the text (a small model loops on its own): only the
                # first is credited to injected KV faults
                garbled = reason.startswith("accept length")
                self.event(req.request_id, "acceptance", reason, credit=garbled)
            verdict = replace(verdict, reasons=(*verdict.reasons, "acceptance: " + reason))
            verdict = replace(verdict, verdict=worst(verdict.verdict, "suspect"))
        return apply_text_checks(req, verdict, req._prompt_text)

    # ---- shadow recompute -----------------------------------------------------------------------
    def shadow_due(self) -> bool:
        """Sampled at shadow_rate; a sampled token is skipped while shadow recomputes have
        taken more than shadow_budget of the engine's step time (see IntegrityConfig)."""
        if not (self.cfg.protections and self.rng.random() < self.cfg.shadow_rate):
            return False
        budget = self.cfg.shadow_budget
        if budget is not None and self.cfg.shadow_rate < 1 and self.shadow_s > budget * self.busy_s:
            self.shadow_skipped += 1
            return False
        return True

    def note_step(self, seconds: float) -> None:
        """The engine's time for one step that computed something (shadows included)."""
        self.busy_s += seconds

    def check_sample(self, rid, tokens, logits, pages, checks) -> tuple[bool, float] | None:
        """The shadow check of a sampled token: on a sample of tokens recompute the logits
        without the cache; if they disagree the step is discarded and its pages invalidated
        in every tier (which page is bad is unknown)."""
        if not self.shadow_due():
            return None
        top1, delta = self.shadow(tokens, logits)
        if not top1 or delta > self.shadow_tolerance():
            reason = f"shadow recompute disagrees (max |dlogit| {delta:.3g})"
            checks.bad[rid].append(reason)
            self.event(rid, "shadow", reason, pages)
            self.kv.tiers.invalidate(list(pages))
        return top1, delta

    def shadow(self, tokens: list[int], served: torch.Tensor) -> tuple[bool, float]:
        """Recompute the next-token logits of `tokens` without the cache; compare."""
        t0 = time.perf_counter()
        ref = self._recompute(tokens)
        self.shadow_s += time.perf_counter() - t0
        self.shadow_runs += 1
        top1 = int(ref.argmax()) == int(served.argmax())
        return top1, float((ref - served).abs().max())

    def shadow_tolerance(self) -> float:
        return self.cfg.shadow_tol if self._exact else 5e-2
