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
- host-bitflip: flips one bit of the READY L2 copy a load-back is about to copy into L1 (rate:
  per load-back). disk-corrupt: truncates or alters the L3 file a read is about to read (rate:
  per L3 read); the store rejects it before any tier holds its bytes.
Counters per kind (runtime/integrity/ledger.py): injected; changed (compared, not assumed: the
bytes a request read differ from the correct ones); detected, by detector, and the delay;
recovered; prevented (the protection stopped the fault from altering anything).
"""

from __future__ import annotations

import itertools
import random
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
        self.wrng = random.Random(cfg.seed + 2)  # the copy workers' draws
        self._tier_events: deque[tuple[str, tuple]] = deque()  # from the copy workers
        self._disk_reads: list[tuple] = []  # (L3 read transfer, file, step) being read
        self._flipped_loads: list[tuple] = []  # (load transfer, flip...) until it landed
        self._ids = itertools.count(1)
        self.step = 0  # engine steps seen (computed or idle)

    def attach(self, kv: StepHandles) -> None:
        self.kv = kv
        self.fence.attach(kv)

    def rate(self, kind: str) -> float:
        return self.cfg.faults.get(kind, 0.0)

    def copy_hooks(self):
        """Copy-engine hooks: skip-fence holds load-backs until their reader has read;
        host-bitflip and disk-corrupt damage copies on their way to a reader."""
        fence = self.rate("skip-fence")
        tier = self.rate("host-bitflip") or self.rate("disk-corrupt")
        if not (fence or tier):
            return None
        from runtime.kv.copy_engine import CopyHooks

        return CopyHooks(
            before_step=self._copy_step if tier else None,
            ready=self.fence.ready if fence else None,
        )

    # ---- step points ------------------------------------------------------------------------
    def before_forward(self, batch, checks: StepChecks) -> None:
        self.land_late_writes(checks, batch)

    def after_forward(self, batch, checks: StepChecks) -> None:
        self.fence.end_forward()

    def after_commit(self, batch, checks: StepChecks) -> list[str]:
        self._note_tier_faults()
        victim = self.maybe_hold_back(batch)
        return [] if victim is None else [victim]

    def recovered(self, rid: str, reasons: list[str]) -> None:
        self.note_recovered(reasons)

    def idle(self) -> None:
        """A step that computed nothing still advances time: delayed writers land (and ack)."""
        self.step += 1
        self.fence.release_all()
        self.land_late_writes(StepChecks(), None)
        self._note_tier_faults()

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

    # ---- tier copies (copy worker threads, then the engine thread) ------------------------
    def _copy_step(self, t, layer: int) -> None:
        """Before step `layer` of transfer `t`, on its worker: host-bitflip flips one bit of
        the L2 copy an L2 -> L1 load-back is about to copy (a READY copy, pinned by the load);
        disk-corrupt damages the L3 file an L3 -> L2 read is about to read. At their rates,
        once per transfer: every injection hits bytes that are on their way to a reader."""
        if layer or self.kv is None:
            return
        if (
            t.kind == "load"
            and self.rate("host-bitflip")
            and self.wrng.random() < self.rate("host-bitflip")
        ):
            i = self.wrng.randrange(len(t.src_slots))
            hs, dst = t.src_slots[i], t.dst_slots[i]
            name = self.wrng.choice(sorted(t.src))
            plane_layer = self.wrng.randrange(t.src[name].shape[0])
            raw = t.src[name][plane_layer, hs].reshape(-1).view(torch.uint8)  # a view
            b = self.wrng.randrange(raw.numel())
            raw[b] ^= 1 << self.wrng.randrange(8)
            flip = (t, hs, dst, name, plane_layer, b, int(raw[b]))
            self._tier_events.append(("host-bitflip", flip))
        if (
            t.kind == "read_l3"
            and self.rate("disk-corrupt")
            and self.wrng.random() < self.rate("disk-corrupt")
        ):
            path = self.kv.disk.path_of(t.tag)
            try:
                data = bytearray(path.read_bytes())
            except OSError:
                return
            if self.wrng.random() < 0.5:
                data = data[: len(data) // 2]
            else:
                data[self.wrng.randrange(len(data))] ^= 0xFF
            path.write_bytes(bytes(data))
            self._tier_events.append(("disk-corrupt", (t, path)))

    def _note_tier_faults(self) -> None:
        """Engine thread, after the step's loads were applied (before the engine reports the
        failed ones): count the tier faults the workers injected and what they changed."""
        pool, alloc, tiers = self.kv.pool, self.kv.alloc, self.kv.tiers
        while self._tier_events:
            kind, what = self._tier_events.popleft()
            self.counts[kind]["injected"] += 1
            if kind == "host-bitflip":
                self.monitor.event("-", "inject", f"host-bitflip: L2 slot {what[1]} {what[3]}")
                self._flipped_loads.append((what[0], *what[2:], None))
            else:
                self.monitor.event("-", "inject", f"disk-corrupt: {what[1].name}")
                self._disk_reads.append((*what, self.step))
        failed = set(tiers.failed_loads)
        keep = []
        for t, dst, name, layer, b, flipped, inj in self._flipped_loads:
            if inj is None:
                if not t.done():  # the copy has not landed yet
                    keep.append((t, dst, name, layer, b, flipped, None))
                    continue
                raw = pool.planes[name][layer, dst].reshape(-1).view(torch.uint8)
                if int(raw[b]) != flipped:  # compared: the page its reader read has the flip
                    continue
                self.counts["host-bitflip"]["changed"] += 1
                owners = alloc.records[dst].owners
                inj = self.ledger.effect("host-bitflip", self.step, [dst], owners)
            if tiers.load_transfer(dst) is t:  # landed, not yet verified (applied in a poll)
                keep.append((t, dst, name, layer, b, flipped, inj))
            elif (t.id, dst) in failed:  # the load's checksum verification rejected it
                self.ledger.detect(inj, "checksum", self.step)
        self._flipped_loads = keep
        keep = []
        for t, path, step in self._disk_reads:
            if not t.done():
                keep.append((t, path, step))
            elif t.result is None and not path.exists():  # rejected (and deleted) by the store
                inj = self.ledger.effect("disk-corrupt", step)  # its bytes reached no tier
                self.ledger.detect(inj, "checksum", self.step)
        self._disk_reads = keep

    def report(self) -> dict[str, dict]:
        return {k: self.ledger.report(k) for k in FAULT_KINDS if self.counts[k]}
