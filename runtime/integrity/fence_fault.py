"""skip-fence, made to take effect whatever the machine's speed: the incident's read-before-ready.

While skip-fence is injected, every L2 -> L1 load-back is held in the copy engine (its layer
steps do not run: `ready` says no) until its first reader arrives. At that first read the
injector draws, once per load-back and forward:
- inject (probability = the rate): the reader does not wait for the fences of that copy, for
  every plane and layer it reads in this forward, and the copy stays held until the forward has
  read (`end_forward`), then lands. The reader reads whatever the LOADING page held before
  (a previous owner's bytes) every time, on any machine;
- otherwise: the copy is released and the reader behaves as configured (waits on its fences
  with protections on; with --unsafe it does not wait: the product's own race).
A load-back no reader reads in a forward is released at the end of that forward (and on idle
steps and shutdown): a held copy never outlives the step that could read it. A hold also ends
on its own after HOLD_MAX_S (so nothing can hang); such a copy may land before its read, so
its reads are not counted as changed (`hold_expired` counts them).

Counted (runtime/integrity/ledger.py): `injected` per load-back whose reader skipped its
fences; `premature_reads` per (layer, plane) read without the wait; `changed` when some of the
bytes those reads got differ from the bytes the copy delivers (compared at the read, while the
copy is held, against its L2 source: never assumed).
"""

from __future__ import annotations

import threading
import time

import torch

HOLD_MAX_S = 30.0  # s; a forward slower than this counts hold_expired, not changed


class FenceHold:
    """The skip-fence injection of one engine (owned by the FaultInjector)."""

    def __init__(self, rate: float, rng, ledger, monitor, clock) -> None:
        self.rate, self.rng, self.ledger, self.monitor = rate, rng, ledger, monitor
        self.clock = clock  # .step: the engine step count (the FaultInjector)
        self.kv = None
        self._lock = threading.Lock()  # _release / _since / _expired: worker and engine thread
        self._release: dict[int, int] = {}  # transfer id -> last layer that may land
        self._since: dict[int, float] = {}  # transfer id -> when a step of it was first held
        self._expired: set[int] = set()
        self._decided: dict[int, str] = {}  # transfer id -> "skip" | "run", this forward
        self._skipped: dict[int, tuple] = {}  # transfer id -> (transfer, changed, injection)

    def attach(self, kv) -> None:
        self.kv = kv

    # ---- copy worker thread ---------------------------------------------------------------
    def ready(self, t, layer: int) -> bool:
        """CopyHooks.ready: may step `layer` of transfer `t` run now?"""
        if t.kind != "load":
            return True
        with self._lock:
            if layer <= self._release.get(t.id, -1):
                return True
            since = self._since.setdefault(t.id, time.monotonic())
            if time.monotonic() - since < HOLD_MAX_S:
                return False
            self._expired.add(t.id)
            self._release[t.id] = t.num_steps
            return True

    # ---- engine thread ----------------------------------------------------------------------
    def read(self, layer: int, plane: str, rows: torch.Tensor, slots: list[int]) -> set[int]:
        """A reader is about to read `rows` of `plane`, layer `layer` (pages `slots`). Returns
        the LOADING slots whose fence wait it skips (injected); every other load it touches is
        released so that its fences can complete."""
        tiers, skipped = self.kv.tiers, set()
        for slot in slots:
            t = tiers.load_transfer(slot)
            if t is None:
                continue
            what = self._decided.get(t.id)
            if what is None:
                inject = not t.fences[layer].done() and self.rng.random() < self.rate
                what = self._decided[t.id] = "skip" if inject else "run"
                if inject:
                    self._inject(t, layer, plane)
                else:
                    self._let_land(t)
            if what == "skip":
                skipped.add(slot)
        for t_id in {tiers.load_transfer(s).id for s in skipped}:
            self._compare(t_id, layer, plane, rows)
        return skipped

    def _inject(self, t, layer: int, plane: str) -> None:
        self.ledger.counts["skip-fence"]["injected"] += 1
        owners = {o for s in t.dst_slots for o in self.kv.alloc.records[s].owners}
        inj = self.ledger.effect("skip-fence", self.clock.step, t.dst_slots, owners)
        self._skipped[t.id] = (t, False, inj)
        pages = list(t.dst_slots)
        detail = f"skip-fence: {plane} L{layer} read while its load-back copy is held"
        self.monitor.event(",".join(sorted(owners)) or "-", "inject", detail, pages)

    def _compare(self, t_id: int, layer: int, plane: str, rows: torch.Tensor) -> None:
        """The bytes this read gets from the held copy's pages vs the bytes the copy delivers."""
        t, changed, inj = self._skipped[t_id]
        self.ledger.counts["skip-fence"]["premature_reads"] += 1
        if changed:
            return
        ps = self.kv.page_size
        dst = torch.tensor(t.dst_slots, dtype=torch.long, device=rows.device)
        mine = rows[torch.isin(rows // ps, dst)]
        if not mine.numel():
            return
        src_of = {d: s for s, d in zip(t.src_slots, t.dst_slots, strict=True)}
        src = torch.tensor([src_of[int(d)] for d in (mine // ps).tolist()], dtype=torch.long)
        want = t.src[plane][layer][src, (mine % ps).cpu()]
        got = self.kv.pool.flat(layer, plane).index_select(0, mine)
        if not torch.equal(got.cpu(), want.to(got.dtype).cpu()):
            self._skipped[t_id] = (t, True, inj)

    def _let_land(self, t) -> None:
        self.kv.tiers.copier.order_after_caller(t)
        with self._lock:
            self._release[t.id] = t.num_steps
        self.kv.tiers.copier.kick()

    def end_forward(self) -> None:
        """The forward has read: the held copies land; count the reads that got other bytes."""
        if not self.rate:
            return
        for t_id, (t, changed, inj) in self._skipped.items():
            with self._lock:
                expired = t_id in self._expired
            if expired:
                self.ledger.counts["skip-fence"]["hold_expired"] += 1
            elif changed:
                self.ledger.counts["skip-fence"]["changed"] += 1
                detail = "skip-fence: a reader read stale bytes before the load-back landed"
                self.monitor.event("-", "inject", detail, sorted(inj.slots))
            self._let_land(t)
        self._skipped.clear()
        self._decided.clear()
        self._prune()

    def release_all(self) -> None:
        """No forward will read before the next schedule: every held copy lands (idle steps,
        shutdown)."""
        self.end_forward()
        for t in self.kv.tiers.load_transfers():
            self._let_land(t)

    def _prune(self) -> None:
        live = {t.id for t in self.kv.tiers.load_transfers()}
        with self._lock:
            for d in (self._release, self._since):
                for t_id in [i for i in d if i not in live]:  # applied: never asked again
                    del d[t_id]
            self._expired &= live
