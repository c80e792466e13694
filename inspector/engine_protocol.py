"""The engine API the inspector codes against (structural: the real engine need not import it).

Every method may be called from any thread. The app calls `step()`, `has_work()`, `submit()` and
`abort()` from worker threads and `snapshot()` from the UI thread at ~10 Hz, so `snapshot()` must
return quickly even while a `step()` is running (e.g. hand out the last published snapshot).
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from runtime.telemetry import EngineSnapshot, TokenEvent


@runtime_checkable
class EngineProtocol(Protocol):
    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        prompt_ids: list[int] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request (exactly one of prompt / messages / prompt_ids); return its id."""
        ...

    def step(self) -> list[TokenEvent]:
        """Run one scheduler iteration over all running requests; return the tokens produced."""
        ...

    def has_work(self) -> bool:
        """True while any request is waiting, running or draining."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request; unknown or finished ids are ignored."""
        ...

    def snapshot(self) -> EngineSnapshot:
        """An immutable picture of the engine at one instant."""
        ...

    def model_info(self) -> dict[str, str]:
        """Human-readable facts about the loaded model (name, arch, dtype, quant, ...)."""
        ...


class ReadOnlyEngine:
    """Base of the inspector's views of an engine someone else drives (a server's): nothing to
    step here, and no chat. Subclasses set ``read_only_reason`` and provide snapshot() and
    model_info()."""

    read_only_reason = "read-only view"

    def step(self) -> list[TokenEvent]:
        time.sleep(0.05)  # the driver thread idles; the engine steps elsewhere
        return []

    def has_work(self) -> bool:
        return False

    def submit(self, *args, **kwargs) -> str:
        raise RuntimeError(self.read_only_reason)

    def abort(self, request_id: str, *args) -> None:
        raise RuntimeError(self.read_only_reason)
