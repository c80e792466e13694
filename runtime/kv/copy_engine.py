"""Asynchronous page copies between tiers, with one fence per (page batch, layer).

A `Transfer` moves whole pages (every layer, every plane) from `src[plane][layer, src_slot]` to
`dst[plane][layer, dst_slot]` for planes laid out `[num_layers, num_slots, page_size, *tail]`
(L1 pool, L2 host pool), or runs one job (an L3 read or write) off the engine thread. Layer `l`
of a copy completes before layer `l + 1`; `Transfer.wait(l)` blocks until layer `l` has landed
(invariant 2: nothing reads a plane of a page before its fence completed).

Back ends:
- CUDA: copies are issued by a worker thread on a dedicated copy stream, after the stream that
  submitted them (an event recorded at submit); each layer records a CUDA event. `Fence.wait()`
  makes the caller's current stream wait on it; `Fence.synchronize()` blocks the host.
- CPU: a real worker thread copies, and each fence is a `threading.Event`, so the ordering logic
  is exercised by CPU tests exactly as on the GPU.
- manual (`threaded=False`): nothing runs until the caller calls `step()`; tests choose which
  transfer advances, which reorders and delays completions deterministically.
Disk jobs run on a second worker ("io") so a slow disk never holds up L1 <-> L2 copies.
`CopyHooks` let tests and fault injection delay (`before_step`), reorder (`pick`) and hold back
(`ready`) steps; a held step never blocks the worker, which runs other transfers meanwhile.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Fence", "Transfer", "CopyHooks", "CopyEngine", "slot_runs", "close_all"]

# Every threaded CopyEngine of the process, for the end of a run (app/shutdown.py): a worker still
# inside a torch copy when the interpreter finalizes would abort the process (see
# runtime/models/cpu_graph.py, "Shutdown").
_ENGINES: weakref.WeakSet = weakref.WeakSet()


def close_all(timeout: float = 30.0) -> bool:
    """Close every copy engine of the process within ``timeout`` seconds in all; True when no
    worker thread is left."""
    deadline = time.monotonic() + timeout
    for eng in list(_ENGINES):
        eng.close(max(0.0, deadline - time.monotonic()))
    return not any(th.is_alive() for eng in list(_ENGINES) for th in eng._threads)


class Fence:
    """Completion of one step of a transfer (one layer of a copy, or a whole job)."""

    __slots__ = ("_event", "_cuda")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._cuda: Any = None  # torch.cuda.Event recorded after the step's copies

    def done(self) -> bool:
        return self._event.is_set() and (self._cuda is None or self._cuda.query())

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the step was issued and order the caller after it; False on timeout.

        CPU: the bytes have landed on return. CUDA: the caller's current stream waits on the
        step's event (use `synchronize` for host-side reads).
        """
        if not self._event.wait(timeout):
            return False
        if self._cuda is not None:
            torch.cuda.current_stream().wait_event(self._cuda)
        return True

    def synchronize(self, timeout: float | None = None) -> bool:
        if not self._event.wait(timeout):
            return False
        if self._cuda is not None:
            self._cuda.synchronize()
        return True

    def _signal(self, cuda_event: Any = None) -> None:
        self._cuda = cuda_event
        self._event.set()


def slot_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """Coalesce (src, dst) slot pairs into runs (src0, dst0, n) where both advance by one."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            s0, d0, n = runs[-1]
            runs[-1] = (s0, d0, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


@dataclass(eq=False)
class Transfer:
    """One submitted copy of a page batch (num_layers steps) or one job (1 step)."""

    id: int
    kind: str
    tag: Any
    fences: list[Fence]
    lane: str  # "copy" | "io"
    src: Mapping[str, torch.Tensor] = field(default_factory=dict)
    dst: Mapping[str, torch.Tensor] = field(default_factory=dict)
    src_slots: tuple[int, ...] = ()
    dst_slots: tuple[int, ...] = ()
    fn: Callable[[], Any] | None = None
    ok: bool = True
    error: str | None = None
    result: Any = None  # a job's return value
    progress: int = 0  # steps executed
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    src_ready: Any = None  # CUDA event: the submitting stream's work before the copy
    driver: Callable[[Transfer], None] | None = None  # manual mode: runs this transfer's next step

    @property
    def num_steps(self) -> int:
        return len(self.fences)

    def wait(self, layer: int, timeout: float | None = None) -> bool:
        """Block until `layer` has landed (CUDA: order the current stream after it).

        Manual mode: runs this transfer's steps on the caller's thread up to `layer`.
        """
        self._drive(layer)
        return self.fences[layer].wait(timeout)

    def wait_all(self, timeout: float | None = None) -> bool:
        """Block the host until every step has completed."""
        self._drive(self.num_steps - 1)
        return all(f.synchronize(timeout) for f in self.fences)

    def _drive(self, step: int) -> None:
        while self.driver is not None and self.progress <= step:
            self.driver(self)

    def done(self) -> bool:
        return all(f.done() for f in self.fences)


@dataclass
class CopyHooks:
    """Test / fault-injection hooks. Both run on the thread that executes the step."""

    pick: Callable[[list[Transfer]], int] | None = None  # which pending transfer goes next
    before_step: Callable[[Transfer, int], None] | None = None  # may sleep or block: a delay
    # May step `layer` of the transfer run now? False holds it back (threaded workers only; it
    # runs once this says True). Called under the copy engine's lock: no blocking, no copy
    # engine calls. Whoever changes its answer calls `CopyEngine.kick()`.
    ready: Callable[[Transfer, int], bool] | None = None


HOLD_POLL_S = 0.02  # a worker re-asks `ready` this often while every pending step is held


class CopyEngine:
    """Runs transfers asynchronously; `poll()` hands completed ones back to the engine thread."""

    def __init__(
        self,
        num_layers: int,
        device: str | torch.device = "cpu",
        threaded: bool = True,
        hooks: CopyHooks | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.hooks = hooks or CopyHooks()
        self.threaded = threaded
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._pending: dict[str, list[Transfer]] = {"copy": [], "io": []}
        self._open: list[Transfer] = []  # submitted, not yet returned by poll()
        self._busy = 0  # steps executing right now
        self._closed = False
        self._threads = []
        if threaded:
            _ENGINES.add(self)
            for lane in ("copy", "io"):
                th = threading.Thread(target=self._worker, args=(lane,), daemon=True)
                th.name = f"kv-{lane}"
                th.start()
                self._threads.append(th)

    # ---- submission (engine thread) -----------------------------------------------------------
    def copy_pages(
        self,
        src: Mapping[str, torch.Tensor],
        dst: Mapping[str, torch.Tensor],
        src_slots: Sequence[int],
        dst_slots: Sequence[int],
        kind: str = "copy",
        tag: Any = None,
    ) -> Transfer:
        """Copy pages src[:, src_slots[i]] -> dst[:, dst_slots[i]] for every plane of `dst`.

        The caller keeps both sides alive and unchanged (no FREE slot, no other writer) until
        the transfer is returned by `poll()`.
        """
        t = Transfer(
            next(self._ids),
            kind,
            tag,
            [Fence() for _ in range(self.num_layers)],
            "copy",
            src=src,
            dst=dst,
            src_slots=tuple(src_slots),
            dst_slots=tuple(dst_slots),
            runs=slot_runs(src_slots, dst_slots),
        )
        if self.cuda:
            t.src_ready = torch.cuda.Event()
            t.src_ready.record(torch.cuda.current_stream(self.device))
        return self._submit(t)

    def run_job(self, fn: Callable[[], Any], kind: str = "job", tag: Any = None) -> Transfer:
        """Run `fn()` on the io worker; its return value lands in `Transfer.result`."""
        return self._submit(Transfer(next(self._ids), kind, tag, [Fence()], "io", fn=fn))

    def _submit(self, t: Transfer) -> Transfer:
        if not self.threaded:
            t.driver = self._advance
        with self._cv:
            assert not self._closed, "copy engine closed"
            self._pending[t.lane].append(t)
            self._open.append(t)
            self._cv.notify_all()
        return t

    # ---- completion (engine thread) -----------------------------------------------------------
    def poll(self) -> list[Transfer]:
        """Transfers whose every step completed, each returned once, oldest first."""
        with self._cv:
            done = [t for t in self._open if t.progress == t.num_steps and t.done()]
            if done:
                ids = {t.id for t in done}
                self._open = [t for t in self._open if t.id not in ids]
        return done

    def kick(self) -> None:
        """The `ready` hook's answer changed: workers look at their held steps again."""
        with self._cv:
            self._cv.notify_all()

    def order_after_caller(self, t: Transfer) -> None:
        """CUDA: the transfer's remaining steps run after the work the caller's current stream
        has queued so far (a held copy released after its reader's kernels). CPU: no-op."""
        if self.cuda:  # pragma: no cover - GPU only
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            t.src_ready = ev

    @property
    def in_flight(self) -> int:
        with self._cv:
            return len(self._open)

    def pending(self) -> list[Transfer]:
        """Transfers with steps left to run (manual mode: what `step` can advance)."""
        with self._cv:
            return self._pending["copy"] + self._pending["io"]

    def step(self, index: int | None = None) -> bool:
        """Manual mode: run the next step of pending transfer `index` (default: the `pick`
        hook's choice, else the oldest) on this thread. False if nothing is pending."""
        assert not self.threaded, "step() is for threaded=False"
        todo = self.pending()
        if not todo:
            return False
        if index is None:
            index = self.hooks.pick(list(todo)) if self.hooks.pick else 0
        self._advance(todo[index])
        return True

    def wait_completion(self, timeout: float | None = None) -> bool:
        """Block until a transfer is complete and not yet polled (manual mode: run one)."""
        if not self.threaded:
            while not any(t.progress == t.num_steps for t in self._open) and self.step():
                pass
            return any(t.progress == t.num_steps for t in self._open)
        with self._cv:
            return self._cv.wait_for(
                lambda: any(t.progress == t.num_steps for t in self._open), timeout
            )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Finish every submitted step (manual mode: run them here, FIFO)."""
        if not self.threaded:
            while self.step():
                pass
            return True
        with self._cv:
            return self._cv.wait_for(
                lambda: self._busy == 0 and not any(self._pending.values()), timeout
            )

    def close(self, timeout: float | None = 60.0) -> bool:
        """Finish pending work, then stop the workers, within ``timeout`` seconds (a copy job
        stuck on a dead disk must not hang the exit); True when every worker has ended. Work
        still pending after the timeout is dropped with its transfers unsignalled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.wait_idle(timeout)
        with self._cv:
            self._closed = True
            for lane in self._pending:
                self._pending[lane].clear()
            self._cv.notify_all()
        for th in self._threads:
            th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(th.is_alive() for th in self._threads)

    # ---- execution (worker threads, or the caller in manual mode) ----------------------------
    def _runnable(self, lane: str) -> list[Transfer]:
        """Pending transfers of `lane` whose next step the `ready` hook lets run (under _cv)."""
        ready = self.hooks.ready
        todo = self._pending[lane]
        return todo if ready is None else [t for t in todo if ready(t, t.progress)]

    def _worker(self, lane: str) -> None:
        while True:
            with self._cv:
                while not (todo := self._runnable(lane)):
                    if self._closed and not self._pending[lane]:
                        return
                    # nothing runnable: wait for a submit or a kick; held steps are re-asked
                    # now and then (a hold may end on its own, e.g. after a time limit)
                    self._cv.wait(HOLD_POLL_S if self._pending[lane] else None)
                t = todo[self.hooks.pick(list(todo)) if self.hooks.pick else 0]
                self._busy += 1
            try:
                self._advance(t)
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def _advance(self, t: Transfer) -> None:
        i = t.progress
        cuda_event = None
        try:
            if self.hooks.before_step is not None:
                self.hooks.before_step(t, i)
            if t.fn is not None:
                t.result = t.fn()
            elif self.cuda:
                cuda_event = self._copy_layer_cuda(t, i)
            else:
                self._copy_layer(t, i, non_blocking=False)
        except Exception as exc:  # a failed step fails the transfer; readers are released
            t.ok, t.error = False, f"{type(exc).__name__}: {exc}"
        with self._cv:
            steps = range(i, t.num_steps) if not t.ok else range(i, i + 1)
            t.progress = steps[-1] + 1
            for j in steps:
                t.fences[j]._signal(cuda_event)
            if t.progress == t.num_steps:
                self._pending[t.lane].remove(t)
            self._cv.notify_all()

    def _copy_layer(self, t: Transfer, layer: int, non_blocking: bool) -> None:
        for name, d in t.dst.items():
            s = t.src[name]
            for s0, d0, n in t.runs:
                d[layer, d0 : d0 + n].copy_(s[layer, s0 : s0 + n], non_blocking=non_blocking)

    def _copy_layer_cuda(self, t: Transfer, layer: int) -> Any:  # pragma: no cover - GPU only
        with torch.cuda.stream(self.stream):
            if t.src_ready is not None:  # every step: `order_after_caller` may replace it
                self.stream.wait_event(t.src_ready)
            self._copy_layer(t, layer, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev
