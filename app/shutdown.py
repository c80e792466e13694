"""How a run ends, written once for every mode (batch, bench, chaos, chat, inspect, make-tiny).

Signals (``Stop.install``):
- first SIGINT (Ctrl-C) or SIGTERM: a stop is requested and the exit status fixed (130 / 143).
  Modes with a loop that polls ``Stop.requested`` (batch) stop admitting, abort their requests
  in flight through Engine.abort (safe reclaim) and flush what they wrote; other modes get
  ``Interrupted`` raised in the main thread (or ``on_stop`` called, for the TUI).
- a second signal: stdout/stderr are flushed and the process leaves at once (os._exit).

Exit (``finish``): engines handed to ``track`` have their requests aborted and are closed, then
every copy engine and CPU-graph compile of the process is stopped within a bound. If a
background thread is still inside native code after that, the interpreter must not finalize
under it (CPython kills such a thread with pthread_exit, whose unwind through torch's C++ frames
makes libstdc++ call std::terminate: exit 134, see runtime/models/cpu_graph.py): the process
flushes its streams and leaves with os._exit(status) instead. Output files are written and
flushed line by line by the modes themselves, so nothing written is lost on that path.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import weakref

EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
THREAD_WAIT_S = 5.0  # how long the exit waits for a compile or copy thread to end

_ENGINES: weakref.WeakSet = weakref.WeakSet()


class Interrupted(BaseException):
    """Raised in the main thread by a first signal in modes without a stop-polling loop."""

    def __init__(self, status: int):
        super().__init__(f"interrupted (exit {status})")
        self.status = status


def track(engine):
    """Close ``engine`` (aborting what it still runs) when the run ends; returns it."""
    _ENGINES.add(engine)
    return engine


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


class Stop:
    """Signal handling for one run. ``cooperative``: the mode polls ``requested`` itself;
    otherwise a first signal calls ``on_stop`` (if given) or raises ``Interrupted``."""

    def __init__(self, cooperative: bool = False, on_stop=None):
        self.cooperative, self.on_stop = cooperative, on_stop
        self.status: int | None = None  # exit status of the first signal, once one came
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.status is not None

    def install(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def __enter__(self) -> Stop:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if self.status is not None:  # second signal: leave now
            _flush()
            os._exit(self.status)
        self.status = 128 + signum
        if self.cooperative:
            return
        if self.on_stop is not None:
            self.on_stop(self.status)
            return
        raise Interrupted(self.status)


def close_tracked() -> None:
    """Abort what tracked engines still run (safe reclaim) and close them."""
    for engine in list(_ENGINES):
        try:
            for rid in list(getattr(engine, "_active", {})):
                engine.abort(rid, "shutdown")
            engine.close()
        except Exception as e:  # an engine broken by the interrupt: its threads are below
            sys.stderr.write(f"kvscope: warning: closing the engine failed: {e}\n")
        _ENGINES.discard(engine)


def stop_background(timeout: float = THREAD_WAIT_S) -> bool:
    """Close tracked engines, then stop every copy engine and compile thread of the process
    within ``timeout``; True when no such thread is left running. Process-wide: for the end of
    the process only (no compile starts afterwards)."""
    close_tracked()
    ok = True
    if "runtime.kv.copy_engine" in sys.modules:
        ok &= sys.modules["runtime.kv.copy_engine"].close_all(timeout)
    if "runtime.models.cpu_graph" in sys.modules:
        ok &= sys.modules["runtime.models.cpu_graph"].abandon_compiles(timeout)
    return ok


def finish(status: int) -> int:
    """End of a run: stop background work; returns ``status`` when the interpreter may
    finalize normally, otherwise flushes and leaves with os._exit(status)."""
    if not stop_background():
        _flush()
        os._exit(status)
    return status
