"""What each injected fault did: counters per fault kind, which detector caught which injection,
and how many engine steps after the fault took effect.

An injection is recorded once it took effect (`effect`): the step its bytes landed or were read,
the L1 pages and requests it touched. A detector that distrusts pages or requests (`flagged`)
credits every recent injection that touched them; the first detection of an injection counts
it as `detected` and its delay (steps from the effect to that detection). Detectors are named
by `runtime.integrity.config.DETECTORS`; any other name (a detector added later) gets its own
column too: nothing here lists them.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from runtime.integrity.config import DETECTORS, FAULT_KINDS

WINDOW_STEPS = 256  # a flag credits injections that took effect at most this many steps ago


@dataclass(eq=False)
class Injection:
    kind: str
    step: int  # engine step at which the fault took effect
    slots: frozenset[int] = frozenset()  # L1 pages whose bytes it altered or that were read early
    rids: frozenset[str] = frozenset()  # requests that read them
    detected: dict[str, int] = field(default_factory=dict)  # detector -> step it flagged this


class Ledger:
    def __init__(self) -> None:
        # kind -> counter: injected, changed, recovered, prevented, detected, and kind-specific
        self.counts = {k: defaultdict(int) for k in FAULT_KINDS}
        self.by_detector = {k: defaultdict(int) for k in FAULT_KINDS}  # kind -> detector -> n
        self.delays: dict[str, list[int]] = {k: [] for k in FAULT_KINDS}
        self._open: deque[Injection] = deque(maxlen=4096)

    def effect(self, kind: str, step: int, slots=(), rids=()) -> Injection:
        inj = Injection(kind, step, frozenset(slots), frozenset(rids))
        self._open.append(inj)
        return inj

    def detect(self, inj: Injection, detector: str, step: int) -> None:
        """`detector` caught `inj` at `step` (each detector counts an injection once)."""
        if detector in inj.detected:
            return
        if not inj.detected:
            self.counts[inj.kind]["detected"] += 1
            self.delays[inj.kind].append(max(0, step - inj.step))
        inj.detected[detector] = step
        self.by_detector[inj.kind][detector] += 1

    def flagged(self, detector: str, step: int, slots=(), rids=()) -> None:
        """`detector` distrusted `slots` / `rids` at `step`: credit the recent injections that
        touched them."""
        slots, rids = frozenset(slots), frozenset(rids)
        for inj in reversed(self._open):  # newest first, in step order
            if step - inj.step > WINDOW_STEPS:
                break
            if inj.slots & slots or inj.rids & rids:
                self.detect(inj, detector, step)

    def report(self, kind: str) -> dict:
        """One kind's figures: counters, detections by detector, detection delay in steps."""
        c, d = self.counts[kind], self.delays[kind]
        detectors = {name: 0 for name in DETECTORS} | dict(self.by_detector[kind])
        return {
            "injected": c["injected"],
            "changed": c["changed"],
            "changed_frac": round(c["changed"] / c["injected"], 3) if c["injected"] else None,
            "detected": c["detected"],
            "detected_by": detectors,
            "detection_delay_steps": {
                "mean": round(sum(d) / len(d), 2) if d else None,
                "max": max(d) if d else None,
            },
            "recovered": c["recovered"],
            "prevented": c["prevented"],
            "extra": {k: v for k, v in c.items() if k not in _MAIN},
        }


_MAIN = {"injected", "changed", "detected", "recovered", "prevented"}
