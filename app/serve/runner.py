"""The engine thread: one thread drives `Engine.step()` for every client (continuous batching).

Clients never call the engine: the event loop hands `admit()` / `abort()` commands to this
thread, which runs them between steps, and every TokenEvent is routed to its request's asyncio
queue through `loop.call_soon_threadsafe`. Admission is bounded: at most `capacity` requests
(the engine's running slots + `max_waiting`) are in flight; past that `admit()` raises
`Overloaded` (HTTP 429). Only the Engine's public methods are used (submit, step, abort,
has_work, request, snapshot, close).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from app.speculation import AcceptanceFlags, speculation_record
from runtime.errors import KvscopeError
from runtime.request import FINISHED
from runtime.telemetry import TokenEvent

KEEP_FINISHED = 64  # finished requests kept in the published snapshot


class Overloaded(Exception):
    """The admission queue is full."""


@dataclass(frozen=True)
class Outcome:
    """The end of a request, read from the engine when its last event arrived."""

    finish_reason: str  # stop | length | abort | timeout | error
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: dict[str, int]
    verdict: str
    violations: tuple[str, ...]
    ttft_s: float | None
    # speculative decoding (app/speculation.py): the request's draft stats, and the acceptance
    # detector's verdicts on it (None: no drafts / never flagged)
    speculation: dict | None = None
    acceptance: dict | None = None


@dataclass(frozen=True)
class Accepted:
    """The engine took the request (the first item of every ticket that is not a Failure)."""


@dataclass(frozen=True)
class Failure:
    """The request could not run: `status` and a one-line message for the error body."""

    status: int
    message: str
    type: str = "invalid_request_error"


@dataclass
class Ticket:
    """A request's handle on the event loop side."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted_at: float = field(default_factory=time.monotonic)
    done: bool = False


class EngineRunner:
    def __init__(
        self,
        engine,
        max_waiting: int = 64,
        idle_wait_s: float = 0.02,
        snapshot_interval_s: float = 0.25,
    ):
        self.engine = engine
        self.capacity = engine.config.max_running + max(0, max_waiting)
        self._tickets: dict[str, Ticket] = {}
        self._lock = threading.Lock()  # guards _tickets
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait = idle_wait_s
        self._ids = itertools.count(1)
        self.failed: str | None = None  # set when step() raised: the server is unhealthy
        self.verdicts: Counter[str] = Counter()  # finished requests by integrity verdict
        self._finished: deque[str] = deque()  # ids of finished requests the engine still holds
        self.finish_reasons: Counter[str] = Counter()
        self.rejected = 0  # 429s
        self.steps = 0
        # Telemetry: the engine thread takes a snapshot between steps (another thread's
        # snapshot() would mostly get the stale one while steps run back to back), but only
        # on demand: a snapshot of the demo's 4096 pages costs ~40 ms, so it is taken every
        # interval while someone watches (want_snapshots) or once when asked (request_snapshot).
        self.snapshot_interval_s = snapshot_interval_s
        self._watch_until = 0.0
        self._want_now = False
        self.snapshot = engine.snapshot()
        self.snapshot_seq = 0
        self.event_kinds: Counter[str] = Counter()  # integrity events by kind, cumulative
        # speculative decoding over finished requests: verify steps, drafted / accepted tokens,
        # and requests the acceptance detector flagged
        self.spec: Counter[str] = Counter()
        self._accept_flags = AcceptanceFlags()
        self._last_event_t = -1.0
        self._snap_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kvscope-engine", daemon=True)

    # ------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the thread, then close the engine (lands L2/L3 writes)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.engine.close()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._tickets)

    def admit(self, submit_kwargs: dict, prefix: str = "req") -> Ticket:
        """Queue a request for the engine thread. Raises Overloaded when the queue is full."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.failed is not None:
                raise KvscopeError(f"the engine failed ({self.failed}); restart the server")
            if len(self._tickets) >= self.capacity:
                self.rejected += 1
                raise Overloaded()
            rid = f"{prefix}-{next(self._ids)}"
            ticket = self._tickets[rid] = Ticket(rid, loop)
        self._cmds.put(("submit", rid, submit_kwargs))
        self._wake.set()
        return ticket

    def abort(self, ticket: Ticket, reason: str = "abort") -> None:
        """Client gone or timed out: the engine releases the pages through safe reclaim."""
        if not ticket.done:
            self._cmds.put(("abort", ticket.request_id, reason))
            self._wake.set()

    # ------------------------------------------------------------ engine thread
    def _deliver(self, rid: str, item, final: bool) -> None:
        with self._lock:
            ticket = self._tickets.pop(rid, None) if final else self._tickets.get(rid)
        if ticket is None:
            return
        if final:
            ticket.done = True
        ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, item)

    def _outcome(self, ev: TokenEvent) -> Outcome:
        req = self.engine.request(ev.request_id)
        self.verdicts[req.verdict] += 1
        self.finish_reasons[ev.finish_reason or "stop"] += 1
        spec = speculation_record(req)
        acceptance = self._accept_flags.record(self.engine, req)
        for key in ("steps", "drafted", "accepted") if spec else ():
            self.spec[key] += spec[key]
        self.spec["flagged"] += acceptance is not None
        return Outcome(
            finish_reason=ev.finish_reason or "stop",
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=dict(req.cached_tokens),
            verdict=req.verdict,
            violations=tuple(req.violations),
            ttft_s=req.ttft_s(),
            speculation=spec,
            acceptance=acceptance,
        )

    def _route(self, events: list[TokenEvent]) -> None:
        for ev in events:
            self._accept_flags.note(ev)
            if ev.finished:
                outcome = self._outcome(ev)
                self._deliver(ev.request_id, ev, final=False)
                self._deliver(ev.request_id, outcome, final=True)
                # The engine keeps a finished request until told to forget it: keep the
                # latest KEEP_FINISHED (the inspector shows them), so memory stays bounded.
                self._finished.append(ev.request_id)
                while len(self._finished) > KEEP_FINISHED:
                    self.engine.forget(self._finished.popleft())
            else:
                self._deliver(ev.request_id, ev, final=False)

    def _command(self, cmd: tuple) -> None:
        if cmd[0] == "submit":
            _, rid, kw = cmd
            try:
                self.engine.submit(request_id=rid, **kw)
                self._deliver(rid, Accepted(), final=False)
            except KvscopeError as e:  # bad prompt, too long, template failure: the client's
                self._deliver(rid, Failure(400, str(e)), final=True)
            except Exception as e:  # a bug: reported as a 500 body, never a traceback
                self._deliver(rid, Failure(500, f"{type(e).__name__}: {e}", "server_error"), True)
        else:
            _, rid, reason = cmd
            self._route(self.engine.abort(rid, reason))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            rids = list(self._tickets)
        for rid in rids:
            self._deliver(rid, Failure(500, message, "server_error"), final=True)

    def want_snapshots(self, seconds: float = 2.0) -> None:
        """A watcher (snapshot stream, in-process TUI): publish every interval for `seconds`."""
        self._watch_until = max(self._watch_until, time.monotonic() + seconds)

    def request_snapshot(self) -> None:
        """Publish one fresh snapshot at the next step boundary (e.g. for /metrics)."""
        self._want_now = True
        self._wake.set()

    def _maybe_snapshot(self) -> None:
        now = time.monotonic()
        due = now < self._watch_until and now - self._snap_at >= self.snapshot_interval_s
        if not (due or self._want_now):
            return
        self._want_now = False
        self._snap_at = now
        snap = self.engine.snapshot()
        for ev in snap.integrity_events:  # time-ordered; count each once
            if ev.time_s > self._last_event_t:
                self.event_kinds[ev.kind] += 1
        if snap.integrity_events:
            self._last_event_t = max(self._last_event_t, snap.integrity_events[-1].time_s)
        # Publish the live requests + the latest finished ones (the engine forgets older ones,
        # see _route), so the stream and the inspector stay small on a long-running server.
        live = [r for r in snap.requests if r.status not in FINISHED]
        done = [r for r in snap.requests if r.status in FINISHED][-KEEP_FINISHED:]
        snap = replace(snap, requests=tuple(done + live))
        self.snapshot, self.snapshot_seq = snap, self.snapshot_seq + 1

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            while True:
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                self._command(cmd)
            if self.failed is not None or not engine.has_work():
                self._maybe_snapshot()
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                continue
            try:
                events = engine.step()
            except Exception as e:  # the engine is broken: fail every request, stay up for /health
                self.failed = f"{type(e).__name__}: {e}"
                self._fail_all(f"engine step failed: {self.failed}")
                continue
            self.steps += 1
            self._route(events)
            self._maybe_snapshot()
        with self._lock:  # shutting down: end what is left
            rids = list(self._tickets)
        for rid in rids:
            self._route(engine.abort(rid, "abort"))
            self._deliver(rid, Failure(503, "the server is shutting down", "server_error"), True)
