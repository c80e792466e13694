"""Fault injection: each kind is a real fault in the real code path, never a faked verdict.

- abort-reuse: after a step writes a request's pages, a copy of those writes is held back as a
  delayed writer (registered on the pages like any writer); the request is then aborted as on
  a timeout, and the held-back write lands two steps later. With safe reclaim the pages wait
  in DRAINING and the write lands harmlessly; with the drain bypassed (or --unsafe) the pages
  go to another request first and the late write overwrites its KV (the incident's bug 1).
- skip-fence: a load-back reader does not wait for its layer's fence while the copy is delayed
  (bug 2), on the indexer-key plane and on the latent plane (K for glm4_moe).
- host-bitflip: flips one bit of a READY L2 copy. disk-corrupt: truncates or alters an L3 file.
Counters per kind: injected, changed (the fault altered bytes some request reads), detected,
recovered, prevented (the protection stopped the fault from altering anything).
"""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from runtime.integrity.config import FAULT_KINDS, IntegrityConfig
from runtime.step_hooks import StepChecks, StepHandles, StepHooks

SKIP_FENCE_PLANES = ("index_k", "latent", "k")
COPY_DELAY_S = 0.003  # per layer step of a copy, while skip-fence is injected


@dataclass
class LateWrite:
    writer: str
    land_step: int
    slots: list[int]
    rows: torch.Tensor  # flat pool rows the held-back write targets
    values: dict[tuple[int, str], torch.Tensor]  # (layer, plane) -> rows' bytes at capture
    victim: str  # the request that was aborted
    epoch: int  # the page's epoch when the writer began
    registered: bool  # False: the writer bypasses the drain (reclaim does not wait for it)


class FaultInjector(StepHooks):
    """A step hook (runtime/step_hooks.py) that injects the faults, counts what they did and
    writes its events to the monitor's log. Touches only the KV handles it is attached to."""

    def __init__(self, cfg: IntegrityConfig, monitor) -> None:
        self.cfg, self.monitor = cfg, monitor
        self.kv: StepHandles | None = None
        self.rng = random.Random(cfg.seed + 1)
        self.counts = {k: defaultdict(int) for k in FAULT_KINDS}
        self.late: list[LateWrite] = []
        self._ids = itertools.count(1)
        self._step = 0

    def attach(self, kv: StepHandles) -> None:
        self.kv = kv

    def rate(self, kind: str) -> float:
        return self.cfg.faults.get(kind, 0.0)

    def copy_hooks(self):
        """Copy-engine hooks: delay each layer step while skip-fence is being injected."""
        if not self.rate("skip-fence"):
            return None
        from runtime.kv.copy_engine import CopyHooks

        return CopyHooks(before_step=lambda t, layer: time.sleep(COPY_DELAY_S))

    # ---- step points ------------------------------------------------------------------------
    def after_forward(self, batch, checks: StepChecks) -> None:
        self.land_late_writes(checks)

    def after_commit(self, batch, checks: StepChecks) -> list[str]:
        victim = self.maybe_hold_back(batch)
        return [] if victim is None else [victim]

    def recovered(self, rid: str, reasons: list[str]) -> None:
        self.note_recovered(reasons)

    def end_step(self) -> None:
        self.corrupt_tiers()

    def idle(self) -> None:
        """A step that computed nothing still advances time: delayed writers land (and ack)."""
        self.tick()
        self.land_late_writes(StepChecks())

    def busy(self) -> bool:
        return bool(self.late)

    def close(self) -> None:
        """Shutdown: every held-back write lands now (and acks), so no writer stays in flight."""
        self.flush_late_writes()
        self.land_late_writes(StepChecks())

    def tick(self) -> None:
        self._step += 1

    # ---- skip-fence --------------------------------------------------------------------------
    def skip_fence(self, plane: str) -> bool:
        r = self.rate("skip-fence")
        if r and plane in SKIP_FENCE_PLANES and self.rng.random() < r:
            self.counts["skip-fence"]["injected"] += 1
            return True
        return False

    def note_skip_fence(self, changed: bool) -> None:
        if changed:
            self.counts["skip-fence"]["changed"] += 1
            self.monitor.event("-", "inject", "skip-fence: read while the load-back was in flight")

    def note_recovered(self, reasons: list[str]) -> None:
        text = " ".join(reasons)
        if "late write" in text:
            self.counts["abort-reuse"]["recovered"] += 1
        if "before its fence" in text:
            self.counts["skip-fence"]["recovered"] += 1

    def note_detected(self, kind: str) -> None:
        self.counts[kind]["detected"] += 1

    # ---- abort-reuse ---------------------------------------------------------------------------
    def maybe_hold_back(self, batch) -> str | None:
        """After a step's commit: hold back one sequence's writes into its last, partly
        filled page as a delayed writer (registered on the page like any writer) and return
        the request to abort as timed out, or None."""
        self._step += 1
        r = self.rate("abort-reuse")
        if not r or not batch.seqs or self.rng.random() >= r:
            return None
        kv = self.kv
        ps = kv.page_size

        def live(w) -> bool:  # still running, and its last page is still being written
            seq = kv.seq(w.request_id)
            if seq is None or seq.status != "running" or len(seq.pages) <= w.stop // ps:
                return False
            return kv.alloc.state(seq.pages[w.stop // ps]).value == "WRITING"

        cands = [w for w in batch.seqs if w.stop % ps and live(w)]
        if not cands:
            return None
        w = self.rng.choice(cands)
        slot = w.page_table[w.stop // ps]
        first = max(w.start, (w.stop // ps) * ps)
        rows = torch.arange(first, w.stop) % ps + slot * ps  # the held-back rows of that page
        values = {
            (layer, name): kv.pool.flat(layer, name).index_select(0, rows.to(kv.device))
            for name in kv.pool.planes
            for layer in range(kv.pool.num_layers)
        }
        writer = f"late#{next(self._ids)}"
        register = self.cfg.protections and not self.cfg.bypass_drain
        if register:  # safe reclaim sees this writer: the page drains until it acks
            kv.alloc.begin_write(slot, writer)
        epoch = kv.alloc.epoch_of(slot)
        self.late.append(
            LateWrite(writer, self._step + 2, [slot], rows, values, w.request_id, epoch, register)
        )
        self.counts["abort-reuse"]["injected"] += 1
        self.monitor.event(w.request_id, "inject", f"abort-reuse: writer into page {slot} delayed")
        return w.request_id

    def land_late_writes(self, checks) -> None:
        """Apply the held-back writes that are due; detect those that landed in a new epoch."""
        kv = self.kv
        due = [lw for lw in self.late if lw.land_step <= self._step]
        self.late = [lw for lw in self.late if lw.land_step > self._step]
        for lw in due:
            rows = lw.rows.to(kv.device)
            for (layer, name), vals in lw.values.items():
                kv.pool.flat(layer, name).index_copy_(0, rows, vals)
            alloc = kv.alloc
            # the writer acks with the epoch it began in: a newer epoch means the page changed
            # hands while this write was in flight (use-after-free)
            reused = [s for s in lw.slots if alloc.epoch_of(s) != lw.epoch]
            if lw.registered:
                for slot in lw.slots:
                    alloc.end_write(slot, lw.writer)
            c = self.counts["abort-reuse"]
            victims = {o for s in reused for o in alloc.records[s].owners}
            if not reused:
                c["prevented"] += 1  # safe reclaim kept the pages until this writer acked
                detail = f"safe reclaim: page {lw.slots} drained until the delayed writer acked"
                self.monitor.event(lw.victim, "recovery", detail, lw.slots)
                continue
            c["changed"] += bool(victims)
            if not self.cfg.protections:
                continue
            c["detected"] += 1
            checks.bad_slots.update(reused)
            for rid in victims:
                reason = f"late write of aborted {lw.victim} landed in pages {reused}"
                self.monitor.event(rid, "epoch", reason, reused)
                if rid in checks.pages:
                    checks.bad[rid].append(reason)
                else:
                    self.monitor.pending_bad[rid].append(reason)

    def flush_late_writes(self) -> None:
        """Land every held-back write now (engine shutdown)."""
        for lw in self.late:
            lw.land_step = 0

    # ---- tier copies -------------------------------------------------------------------------
    def corrupt_tiers(self) -> None:
        """host-bitflip / disk-corrupt, at their rates, once per step."""
        kv = self.kv
        if self.rate("host-bitflip") and kv.host is not None:
            ready = [i for i, s in enumerate(kv.host.slots) if s.state == "READY" and not s.busy]
            if ready and self.rng.random() < self.rate("host-bitflip"):
                hs = self.rng.choice(ready)
                name = self.rng.choice(sorted(kv.host.planes))
                layer = self.rng.randrange(kv.host.planes[name].shape[0])
                raw = kv.host.planes[name][layer, hs].reshape(-1).view(torch.uint8)  # a view
                i = self.rng.randrange(raw.numel())
                raw[i] ^= 1 << self.rng.randrange(8)
                self.counts["host-bitflip"]["injected"] += 1
                self.monitor.event("-", "inject", f"host-bitflip: L2 slot {hs} plane {name}")
        if self.rate("disk-corrupt") and kv.disk is not None:
            files = [p for p in kv.disk.root.rglob("*") if p.is_file() and p.stat().st_size > 64]
            if files and self.rng.random() < self.rate("disk-corrupt"):
                path = self.rng.choice(sorted(files))
                data = bytearray(path.read_bytes())
                if self.rng.random() < 0.5:
                    data = data[: len(data) // 2]
                else:
                    data[self.rng.randrange(len(data))] ^= 0xFF
                path.write_bytes(bytes(data))
                self.counts["disk-corrupt"]["injected"] += 1
                self.monitor.event("-", "inject", f"disk-corrupt: {path.name}")

    def report(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.counts.items() if v}
