"""Fault injection: each kind is a real fault in the real code path, never a faked verdict, and
each takes effect on every machine whatever its speed (no race decides whether it happens).

- abort-reuse: after a step writes a request's pages, a copy of those writes is held back as a
  delayed writer (registered on the pages like any writer); the request is then aborted as on
  a timeout. With safe reclaim the pages wait in DRAINING and the write lands harmlessly two
  steps later (`prevented`); with the drain bypassed (or --unsafe) the page goes to another
  request first, and the write lands just before that request's next read of the rows it
  overwrites (the incident's bug 1), or after LATE_DEADLINE steps if no one reads them.
- skip-fence: a load-back reader does not wait for its layer's fences while the copy is held
  until the read happened (bug 2): runtime/integrity/fence_fault.py.
- host-bitflip: flips one bit of a READY L2 copy. disk-corrupt: truncates or alters an L3 file.
Counters per kind (runtime/integrity/ledger.py): injected; changed (compared, not assumed: the
bytes a request read differ from the correct ones); detected, by detector, and the delay;
recovered; prevented (the protection stopped the fault from altering anything).
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import deque
from dataclasses import dataclass

import torch

from runtime.integrity.config import FAULT_KINDS, IntegrityConfig
from runtime.integrity.fence_fault import FenceHold
from runtime.integrity.ledger import Ledger
from runtime.step_hooks import StepChecks, StepHandles, StepHooks

LATE_DEADLINE = 64  # steps a bypassing late write waits for a reader of the reused page


@dataclass
class LateWrite:
    writer: str
    land_step: int  # registered: lands then; otherwise the deadline
    slots: list[int]
    rows: torch.Tensor  # flat pool rows the held-back write targets
    values: dict[tuple[int, str], torch.Tensor]  # (layer, plane) -> rows' bytes at capture
    victim: str  # the request that was aborted
    epoch: int  # the page's epoch when the writer began
    registered: bool  # False: the writer bypasses the drain (reclaim does not wait for it)


@dataclass
class Flip:
    """One flipped bit of an L2 copy, until that copy is replaced."""

    slot: int  # host slot
    plane: str
    layer: int
    byte: int  # index in the page's layer plane, as bytes
    value: int  # the byte after the flip
    sums: object  # the host slot's checksum record at the flip (a new copy replaces it)


class FaultInjector(StepHooks):
    """A step hook (runtime/step_hooks.py) that injects the faults, counts what they did and
    writes its events to the monitor's log. Touches only the KV handles it is attached to."""

    def __init__(self, cfg: IntegrityConfig, monitor) -> None:
        self.cfg, self.monitor = cfg, monitor
        self.kv: StepHandles | None = None
        self.rng = random.Random(cfg.seed + 1)
        self.ledger = Ledger()
        self.counts = self.ledger.counts  # kind -> counter (see the module doc)
        self.late: list[LateWrite] = []
        self.fence = FenceHold(self.rate("skip-fence"), self.rng, self.ledger, monitor, self)
        self._flips: list[Flip] = []
        self._flips_lock = threading.Lock()
        self._flips_loaded: deque[tuple[Flip, int]] = deque()  # (flip, L1 slot): copy worker
        self._corrupted: list[tuple[object, int]] = []  # (L3 file path, step)
        self._seen = {"rejected": 0}
        self._ids = itertools.count(1)
        self.step = 0  # engine steps seen (computed or idle)

    def attach(self, kv: StepHandles) -> None:
        self.kv = kv
        self.fence.attach(kv)

    def rate(self, kind: str) -> float:
        return self.cfg.faults.get(kind, 0.0)

    def copy_hooks(self):
        """Copy-engine hooks: skip-fence holds load-backs until their reader has read;
        host-bitflip sees which flipped L2 copies are loaded back."""
        fence, flips = self.rate("skip-fence"), self.rate("host-bitflip")
        if not (fence or flips):
            return None
        from runtime.kv.copy_engine import CopyHooks

        return CopyHooks(
            before_step=self._copy_step if flips else None,
            ready=self.fence.ready if fence else None,
        )

    # ---- step points ------------------------------------------------------------------------
    def before_forward(self, batch, checks: StepChecks) -> None:
        self.land_late_writes(checks, batch)

    def after_forward(self, batch, checks: StepChecks) -> None:
        self.fence.end_forward()

    def after_commit(self, batch, checks: StepChecks) -> list[str]:
        self._note_loaded_flips()
        victim = self.maybe_hold_back(batch)
        return [] if victim is None else [victim]

    def recovered(self, rid: str, reasons: list[str]) -> None:
        self.note_recovered(reasons)

    def end_step(self) -> None:
        self._note_disk_rejections()
        self.corrupt_tiers()

    def idle(self) -> None:
        """A step that computed nothing still advances time: delayed writers land (and ack)."""
        self.step += 1
        self.fence.release_all()
        self.land_late_writes(StepChecks(), None)
        self._note_loaded_flips()
        self._note_disk_rejections()

    def busy(self) -> bool:
        return bool(self.late)

    def close(self) -> None:
        """Shutdown: every held copy and held-back write lands now (and acks)."""
        if self.kv is None:
            return
        self.fence.release_all()
        self.flush_late_writes()
        self.land_late_writes(StepChecks(), None)

    def note_recovered(self, reasons: list[str]) -> None:
        text = " ".join(reasons)
        if "late write" in text:
            self.counts["abort-reuse"]["recovered"] += 1
        if "before its fence" in text:
            self.counts["skip-fence"]["recovered"] += 1

    # ---- skip-fence (runtime/integrity/fence_fault.py) ------------------------------------------
    def fence_reads(self, layer: int, plane: str, rows, slots: list[int]) -> set[int]:
        """The LOADING slots among `slots` whose fence this read skips (injected)."""
        if not self.fence.rate:
            return set()
        return self.fence.read(layer, plane, rows, slots)

    # ---- abort-reuse ---------------------------------------------------------------------------
    def maybe_hold_back(self, batch) -> str | None:
        """After a step's commit: hold back one sequence's writes into its last, partly
        filled page as a delayed writer (registered on the page like any writer) and return
        the request to abort as timed out, or None."""
        self.step += 1
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
        land = self.step + (2 if register else LATE_DEADLINE)
        self.late.append(
            LateWrite(writer, land, [slot], rows, values, w.request_id, epoch, register)
        )
        self.counts["abort-reuse"]["injected"] += 1
        self.monitor.event(w.request_id, "inject", f"abort-reuse: writer into page {slot} delayed")
        return w.request_id

    def _readers(self, lw: LateWrite, batch) -> dict[str, torch.Tensor]:
        """Requests of `batch` about to read rows `lw` overwrites -> those rows (flat). A
        request reads its page's rows written by earlier steps; the rows this step writes are
        stored before they are read, so a late write there changes nothing anyone reads."""
        out, ps, slot = {}, self.kv.page_size, lw.slots[0]
        if batch is None or self.kv.alloc.state(slot).value in ("FREE", "LOADING"):
            return out
        for w in batch.seqs:
            if slot not in w.page_table:
                continue
            written = min(ps, max(0, w.start - w.page_table.index(slot) * ps))
            hit = lw.rows[(lw.rows % ps) < written]
            if hit.numel():
                out[w.request_id] = hit
        return out

    def land_late_writes(self, checks, batch) -> None:
        """Apply the held-back writes that are due (before this step's forward reads): a
        registered one at its step; a bypassing one once its page changed hands and a request
        of `batch` is about to read rows it overwrites, or at its deadline. A write acking in
        a newer epoch than it began in landed in another request's page: detected (epoch)."""
        kv, keep = self.kv, []
        for lw in self.late:
            readers = {} if lw.registered else self._readers(lw, batch)
            reused_now = kv.alloc.epoch_of(lw.slots[0]) != lw.epoch
            if lw.land_step > self.step and not (readers and reused_now):
                keep.append(lw)
                continue
            self._land(lw, checks, readers)
        self.late = keep

    def _land(self, lw: LateWrite, checks, readers: dict[str, torch.Tensor]) -> None:
        kv, alloc, c = self.kv, self.kv.alloc, self.counts["abort-reuse"]
        changed = False  # compared: do the rows its readers read now hold other bytes?
        for rows in readers.values():
            pos = torch.isin(lw.rows, rows)
            for (layer, name), vals in lw.values.items():
                now = kv.pool.flat(layer, name).index_select(0, lw.rows[pos].to(kv.device))
                changed = changed or not torch.equal(now, vals[pos.to(vals.device)])
        rows = lw.rows.to(kv.device)
        for (layer, name), vals in lw.values.items():
            kv.pool.flat(layer, name).index_copy_(0, rows, vals)
        # the writer acks with the epoch it began in: a newer epoch means the page changed
        # hands while this write was in flight (use-after-free)
        reused = [s for s in lw.slots if alloc.epoch_of(s) != lw.epoch]
        if lw.registered:
            for slot in lw.slots:
                alloc.end_write(slot, lw.writer)
        if not reused:
            c["prevented"] += 1  # safe reclaim kept the pages until this writer acked
            detail = f"safe reclaim: page {lw.slots} drained until the delayed writer acked"
            self.monitor.event(lw.victim, "recovery", detail, lw.slots)
            return
        owners = {o for s in reused for o in alloc.records[s].owners}
        c["landed_in_reused_page"] += 1
        c["changed"] += changed
        inj = self.ledger.effect("abort-reuse", self.step, reused, readers if changed else ())
        if not self.cfg.protections:
            return
        checks.bad_slots.update(reused)
        for rid in owners:
            reason = f"late write of aborted {lw.victim} landed in pages {reused}"
            self.ledger.detect(inj, "epoch", self.step)
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
                flip = Flip(hs, name, layer, i, int(raw[i]), kv.host.slots[hs].checksums)
                with self._flips_lock:
                    self._flips.append(flip)
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
                self._corrupted.append((path, self.step))
                self.counts["disk-corrupt"]["injected"] += 1
                self.monitor.event("-", "inject", f"disk-corrupt: {path.name}")

    def _copy_step(self, t, layer: int) -> None:
        """Copy worker, before step `layer` of `t`: does a load-back copy a flipped byte into
        L1 (the byte in L2 still differs from the copy's correct byte)?"""
        if t.kind != "load":
            return
        host = self.kv.host
        with self._flips_lock:
            for flip in list(self._flips):
                if flip.layer != layer or flip.slot not in t.src_slots:
                    continue
                self._flips.remove(flip)
                raw = host.planes[flip.plane][layer, flip.slot].reshape(-1).view(torch.uint8)
                same_copy = host.slots[flip.slot].checksums is flip.sums
                if same_copy and int(raw[flip.byte]) == flip.value:
                    dst = t.dst_slots[t.src_slots.index(flip.slot)]
                    self._flips_loaded.append((flip, dst))

    def _note_loaded_flips(self) -> None:
        """Engine thread, after the step's loads were applied: flipped bytes that reached L1
        changed what their readers read (then the load's checksum rejects them, if on)."""
        alloc = self.kv.alloc
        while self._flips_loaded:
            _, slot = self._flips_loaded.popleft()
            self.counts["host-bitflip"]["changed"] += 1
            owners = set(alloc.records[slot].owners)
            self.ledger.effect("host-bitflip", self.step, [slot], owners)

    def _note_disk_rejections(self) -> None:
        """A damaged L3 file is rejected when read (header/checksums), before any tier holds
        its bytes: detected (checksum), never changed data a request read."""
        disk = self.kv.disk
        if disk is None or not self._corrupted:
            return
        new = disk.stats["rejected"] - self._seen["rejected"]
        self._seen["rejected"] = disk.stats["rejected"]
        keep = []
        for path, step in self._corrupted:
            if new > 0 and not path.exists():
                new -= 1
                inj = self.ledger.effect("disk-corrupt", step)
                self.ledger.detect(inj, "checksum", self.step)
            elif path.exists():
                keep.append((path, step))
        self._corrupted = keep

    def report(self) -> dict[str, dict]:
        return {k: self.ledger.report(k) for k in FAULT_KINDS if self.counts[k]}
