"""The named points of `Engine.step()` where integrity checks and fault injection plug in.

`step()` is the data path: schedule -> forward -> verify -> sample -> commit -> stream. A hook
(runtime/integrity/: the IntegrityMonitor and its FaultInjector) implements some of the points
below; the engine calls every registered hook at each point, in registration order, and gives
them `StepHandles` (the KV state and a read-only view of the scheduler), never itself.

Points, in the order one step reaches them (`batch` is the scheduler's `StepBatch`, `checks`
the step's `StepChecks`):
- `before_forward(batch, checks)`: scheduled, nothing computed. A hook adds to `checks.bad`
  the sequences whose reads are already known to be untrusted (epochs or owners changed,
  reasons carried over from an earlier step). `checks.pages` holds each sequence's pages.
- (inside the forward the pool's `read_guard` runs before every read: fence waits and checks)
- `after_forward(batch, checks)`: the model stored the new tokens' planes and read its
  context; nothing sampled. Verify: late writers land, bytes are re-hashed; every untrusted
  sequence goes into `checks.bad`, every untrusted L1 page into `checks.bad_slots`.
- `check_sample(rid, tokens, logits, pages, checks)`: after a token of `rid` was sampled from
  `logits` [V] (context `tokens`). Returns a shadow result `(top1 agrees, max |dlogit|)` or
  None when not checked; a hook that distrusts the token adds `rid` to `checks.bad`, and the
  engine then drops the sample (it is drawn again on the recompute).
- `after_commit(batch, checks) -> list[str]`: the scheduler acked the step's writes and
  discarded `checks.bad`. Returns request ids the engine must end as timed out (an injected
  abort); they are aborted after this step's tokens are streamed.
- `recovered(rid, reasons)`: the step of `rid` was discarded for `reasons` and is recomputed.
- `end_step()`: the step's tokens are streamed; last point of a step that computed something.
- `idle()`: the step computed nothing (waiting on transfers); time still advances.
- `busy() -> bool`: a hook still has work that lands on later steps (an idle engine must keep
  stepping instead of declaring a stall).
- `close()`: engine shutdown; nothing may stay in flight afterwards.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.kv.allocator import PageAllocator
from runtime.kv.disk_store import DiskStore
from runtime.kv.host_pool import HostPool
from runtime.kv.pool import KVPool
from runtime.kv.tier_controller import TierController


@dataclass
class StepChecks:
    bad: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # request id -> reasons its step must be recomputed
    pages: dict[str, tuple[int, ...]] = field(default_factory=dict)  # pages whose reads count
    checksums: dict[str, int] = field(default_factory=dict)  # page planes re-hashed, per request
    bad_slots: set[int] = field(default_factory=set)  # L1 pages untrusted in every tier


@dataclass(frozen=True)
class StepHandles:
    """What a hook may touch: the KV state of one engine and a read-only scheduler view."""

    pool: KVPool
    alloc: PageAllocator
    tiers: TierController
    host: HostPool | None
    disk: DiskStore | None
    seq: Callable  # request id -> the scheduler's SeqState (status, pages) or None; read only
    page_size: int
    device: torch.device


class StepHooks:
    """Base of a hook: every point is a no-op; override the ones the hook needs."""

    def before_forward(self, batch, checks: StepChecks) -> None:
        pass

    def after_forward(self, batch, checks: StepChecks) -> None:
        pass

    def check_sample(
        self, rid: str, tokens: list[int], logits: torch.Tensor, pages, checks: StepChecks
    ) -> tuple[bool, float] | None:
        return None

    def after_commit(self, batch, checks: StepChecks) -> list[str]:
        return []

    def recovered(self, rid: str, reasons: list[str]) -> None:
        pass

    def end_step(self) -> None:
        pass

    def idle(self) -> None:
        pass

    def busy(self) -> bool:
        return False

    def close(self) -> None:
        pass
