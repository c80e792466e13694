"""Expert cache: a fixed pool of expert slots on the compute device, shared by all MoE layers.

Routed experts live in an `ExpertStore` (host memory or memory-mapped files). A layer that needs
experts ``acquire``s them: a cached expert is a hit, a missing one is loaded into a free or evicted
slot (LRU, or least-frequently-used with ties broken by age). While the layer computes, the
next layer's likely experts (its router applied to this layer's input) are prefetched: on CUDA
each copy runs on a dedicated copy stream and records an event, and the compute stream waits on
that event before it reads the slot; on CPU a worker thread copies and the layer waits on the
job's future. A cold expert can instead be computed on the CPU straight from the store when
``cpu_compute`` is on and that is estimated cheaper than the transfer.

Contracts (all metadata is guarded by ``self._lock``; copies run outside it):
- A slot is never evicted while pinned (acquired by a computing layer) or while a load into it is
  in flight.
- A slot is read only after its load completed: `acquire` waits on the future (CPU) or makes the
  compute stream wait on the slot's ready event (CUDA) before returning.
- On CUDA a slot is overwritten only after the compute that last read it: `release` records a
  free event on the compute stream and the next copy into the slot waits on it.
Telemetry (`stats()`): hits / misses per layer x expert, bytes copied into slots, prefetch
precision (prefetched experts that were used) and recall (used experts that were predicted).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from runtime.weights.expert_store import ExpertStore

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ExpertStats:
    """Immutable expert-cache telemetry. Rows are indexed by decoder layer (dense layers: ())."""

    tier: str
    policy: str
    capacity: int  # slots
    slot_bytes: int
    resident: int  # slots holding an expert
    hits: tuple[tuple[int, ...], ...]
    misses: tuple[tuple[int, ...], ...]
    bytes_transferred: int  # bytes copied into slots (host/mmap -> device)
    loads: int  # slot loads, demand + prefetch
    streamed: int  # misses served without a slot (every slot pinned by the same layer)
    cpu_computed: int  # cold experts computed on the CPU from the store
    prefetch_issued: int
    prefetch_useful: int  # prefetched and then used before eviction
    prefetch_late: int  # used while the prefetch copy was still in flight
    prefetch_wasted: int  # prefetched and evicted unused
    predicted: int  # experts the previous layer predicted (router look-ahead)
    predicted_used: int  # ... that the layer then used
    used: int  # experts layers used (sum over acquires)

    @property
    def total_hits(self) -> int:
        return sum(map(sum, self.hits))

    @property
    def total_misses(self) -> int:
        return sum(map(sum, self.misses))

    @property
    def hit_rate(self) -> float:
        n = self.total_hits + self.total_misses
        return self.total_hits / n if n else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Precision of the look-ahead: predicted experts that the next layer used."""
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Used experts that had been predicted by the previous layer."""
        return self.predicted_used / self.used if self.used else 0.0

    @property
    def heat(self) -> tuple[tuple[int, ...], ...]:
        """Hits per layer x expert: the shape EngineSnapshot.expert_heat wants."""
        return self.hits

    def summary(self) -> dict:
        return {
            "tier": self.tier,
            "policy": self.policy,
            "capacity": self.capacity,
            "resident": self.resident,
            "hits": self.total_hits,
            "misses": self.total_misses,
            "hit_rate": round(self.hit_rate, 4),
            "bytes_transferred": self.bytes_transferred,
            "loads": self.loads,
            "streamed": self.streamed,
            "cpu_computed": self.cpu_computed,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_useful": self.prefetch_useful,
            "prefetch_late": self.prefetch_late,
            "prefetch_wasted": self.prefetch_wasted,
            "prefetch_accuracy": round(self.prefetch_accuracy, 4),
            "prefetch_recall": round(self.prefetch_recall, 4),
        }


@dataclass
class Acquired:
    """What `acquire` hands a layer: expert -> (gate_up weight, down weight) for linear(), and
    expert -> slot for the experts that sit in slots (for a fused kernel over the slot pool)."""

    weights: dict[int, tuple]
    slots: dict[int, int]
    pinned: list[int] = field(default_factory=list)


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        capacity: int,
        device: torch.device,
        num_layers: int,
        moe_layers: list[int],
        policy: str = "lru",
        prefetch: bool = True,
        cpu_compute: bool = False,
    ):
        assert capacity >= 1 and policy in ("lru", "lfu"), (capacity, policy)
        self.store, self.fmt = store, store.fmt
        self.capacity, self.device, self.policy = capacity, torch.device(device), policy
        self.prefetch_enabled, self.cpu_compute = prefetch, cpu_compute
        self.cuda = self.device.type == "cuda"
        self.pools = {
            k: torch.empty((capacity, *shape), dtype=dt, device=self.device)
            for k, (shape, dt) in self.fmt.spec().items()
        }
        self.slot_bytes = self.fmt.nbytes
        self._slot_key: list[Key | None] = [None] * capacity
        self._slot_of: dict[Key, int] = {}
        self._pins = [0] * capacity
        self._pending: dict[int, Future] = {}  # slot -> load in flight
        self._ready: list[torch.cuda.Event | None] = [None] * capacity  # CUDA: copy done
        self._free: list[torch.cuda.Event | None] = [None] * capacity  # CUDA: last read done
        self._decoded: list[tuple | None] = [None] * capacity
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest use first
        self._freq: dict[Key, int] = {}
        self._prefetched: set[Key] = set()
        self._touches = 0
        self._lock = threading.RLock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch")
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        e = store.num_experts
        moe = set(moe_layers)
        self._hits = [[0] * e if li in moe else [] for li in range(num_layers)]
        self._misses = [[0] * e if li in moe else [] for li in range(num_layers)]
        self._n = dict.fromkeys(
            (
                "bytes", "loads", "streamed", "cpu", "issued", "useful", "late", "wasted",
                "predicted", "predicted_used", "used",
            ),
            0,
        )  # fmt: skip
        self._cpu_flops = 5e10  # CPU expert GEMM throughput (FLOP/s), measured on first use
        self._h2d_bps = 2e10 if store.pinned else 5e9  # host->device bytes/s, idem
        self._calibrated: bool | None = None

    # ------------------------------------------------------------------ slots
    def _touch(self, key: Key) -> None:
        self._order.pop(key, None)
        self._order[key] = None
        self._freq[key] = self._freq.get(key, 0) + 1
        self._touches += 1
        if self._touches % (16 * self.capacity) == 0:  # LFU ageing: old popularity fades
            self._freq = {k: f // 2 for k, f in self._freq.items() if f > 1}

    def _victim(self, keep: set[Key]) -> int | None:
        """A slot to (re)use: an empty one, else the LRU / LFU unpinned, settled one."""
        for s, k in enumerate(self._slot_key):
            if k is None and s not in self._pending:
                return s
        best, best_rank = None, None
        for age, key in enumerate(self._order):
            s = self._slot_of.get(key)
            if s is None or self._pins[s] or s in self._pending or key in keep:
                continue
            rank = (self._freq.get(key, 0), age) if self.policy == "lfu" else (age,)
            if best_rank is None or rank < best_rank:
                best, best_rank = s, rank
                if self.policy == "lru":
                    break  # the first eligible in age order is the oldest
        return best

    def _assign(self, slot: int, key: Key) -> None:
        old = self._slot_key[slot]
        if old is not None:
            del self._slot_of[old]
            self._order.pop(old, None)
            if old in self._prefetched:
                self._prefetched.discard(old)
                self._n["wasted"] += 1
        self._slot_key[slot] = key
        self._slot_of[key] = slot
        self._decoded[slot] = None

    def _load(self, slot: int, key: Key) -> None:
        """Copy expert ``key`` into ``slot`` (caller reserved the slot as pending)."""
        rec = self.store.record(*key)
        if self.cuda:
            if not self.store.pinned:
                rec = {k: v.pin_memory() for k, v in rec.items()}
            with torch.cuda.stream(self._copy_stream):
                if self._free[slot] is not None:
                    self._copy_stream.wait_event(self._free[slot])
                for k, pool in self.pools.items():
                    pool[slot].copy_(rec[k].view(pool.shape[1:]), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._copy_stream)
            self._ready[slot] = ev
        else:
            for k, pool in self.pools.items():
                pool[slot].copy_(rec[k].view(pool.shape[1:]))
        with self._lock:
            self._n["bytes"] += self.slot_bytes
            self._n["loads"] += 1

    def _slot_weights(self, slot: int) -> tuple:
        if self._decoded[slot] is None:
            self._decoded[slot] = self.fmt.decode({k: p[slot] for k, p in self.pools.items()})
        return self._decoded[slot]

    def _cpu_is_cheaper(self, key: Key, tokens: int) -> bool:
        """Compute a missing expert on the CPU instead of copying it in? Only with
        ``cpu_compute``; on CUDA when the estimated CPU GEMM time beats the copy time."""
        if not self.cpu_compute:
            return False
        if not self.cuda:
            return True  # compute in place from the store: no copy at all
        if self._calibrated is None:
            self._calibrated = self._calibrate(key)
        flops = 6 * tokens * self.fmt.d * self.fmt.i
        return flops / self._cpu_flops < self.slot_bytes / self._h2d_bps

    def _calibrate(self, key: Key) -> bool:
        """Measure this machine's CPU expert throughput and host->device copy speed once."""
        from runtime.weights.linear import linear

        rec = self.store.record(*key)
        gu, dn = self.fmt.decode(rec)
        x = torch.randn(4, self.fmt.d, dtype=self.fmt.dtype)
        t0 = time.perf_counter()
        for _ in range(3):
            linear(linear(x, gu)[:, : self.fmt.i], dn)
        dt = time.perf_counter() - t0
        self._cpu_flops = 3 * 6 * 4 * self.fmt.d * self.fmt.i / max(dt, 1e-9)
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for v in rec.values():
            v.to(self.device, non_blocking=self.store.pinned)
        torch.cuda.synchronize(self.device)
        self._h2d_bps = self.slot_bytes / max(time.perf_counter() - t0, 1e-9)
        return True

    # ------------------------------------------------------------------ API
    def acquire(self, layer: int, experts: list[int], tokens: list[int]) -> Acquired:
        """Make ``experts`` of ``layer`` usable (``tokens[j]`` rows go to ``experts[j]``); pins
        their slots until `release`. Mutates cache state and telemetry."""
        out = Acquired({}, {})
        demand: list[tuple[int, Key]] = []
        waits: list[Future] = []
        host: list[tuple[int, bool]] = []  # (expert, computed on CPU) served from the store
        with self._lock:
            keep = {(layer, e) for e in experts}
            for e in experts:  # hits first, so misses cannot evict them
                s = self._slot_of.get((layer, e))
                if s is None:
                    continue
                self._hits[layer][e] += 1
                self._pins[s] += 1
                out.pinned.append(s)
                out.slots[e] = s
                self._touch((layer, e))
                if (layer, e) in self._prefetched:
                    self._prefetched.discard((layer, e))
                    self._n["useful"] += 1
                    if s in self._pending:
                        self._n["late"] += 1
                if s in self._pending:
                    waits.append(self._pending[s])
            for e, n in zip(experts, tokens, strict=True):
                key = (layer, e)
                if e in out.slots:
                    continue
                self._misses[layer][e] += 1
                if self._cpu_is_cheaper(key, n):
                    host.append((e, True))
                    continue
                s = self._victim(keep)
                if s is None:
                    host.append((e, False))
                    continue
                self._assign(s, key)
                self._touch(key)
                self._pins[s] += 1
                out.pinned.append(s)
                out.slots[e] = s
                fut: Future = Future()
                self._pending[s] = fut
                demand.append((s, key))
        for s, key in demand:  # demand loads, in this thread
            try:
                self._load(s, key)
            finally:
                with self._lock:
                    self._pending.pop(s).set_result(None)
        for fut in waits:
            fut.result()
        for e, on_cpu in host:
            rec = self.store.record(layer, e)
            if not on_cpu:
                rec = {k: v.to(self.device, non_blocking=self.store.pinned) for k, v in rec.items()}
            with self._lock:
                self._n["cpu" if on_cpu else "streamed"] += 1
                self._n["bytes"] += 0 if on_cpu else self.slot_bytes
            out.weights[e] = self.fmt.decode(rec)
        for e, s in out.slots.items():
            if self.cuda and self._ready[s] is not None:
                torch.cuda.current_stream(self.device).wait_event(self._ready[s])
            out.weights[e] = self._slot_weights(s)
        return out

    def release(self, acquired: Acquired) -> None:
        """Unpin the slots of an `acquire` once the layer's compute has been issued."""
        ev = None
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        with self._lock:
            for s in acquired.pinned:
                self._pins[s] -= 1
                if ev is not None:
                    self._free[s] = ev

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Start loading ``experts`` of ``layer`` in the background (most wanted first); returns
        how many loads were issued. Never evicts pinned, in-flight or just-predicted slots."""
        if not self.prefetch_enabled:
            return 0
        issued = 0
        with self._lock:
            keep = {(layer, e) for e in experts}
            for e in experts:
                key = (layer, e)
                if key in self._slot_of:
                    self._order.move_to_end(key)  # protect it until the layer runs
                    continue
                s = self._victim(keep)
                if s is None:
                    break
                self._assign(s, key)
                self._order.pop(key, None)
                self._order[key] = None
                self._prefetched.add(key)
                fut: Future = Future()
                self._pending[s] = fut
                self._worker.submit(self._prefetch_job, s, key, fut)
                issued += 1
            self._n["issued"] += issued
        return issued

    def _prefetch_job(self, slot: int, key: Key, fut: Future) -> None:
        try:
            self._load(slot, key)
        finally:
            with self._lock:
                self._pending.pop(slot, None)
            fut.set_result(None)

    def note_prediction(self, predicted: set[int], used: list[int]) -> None:
        with self._lock:
            self._n["predicted"] += len(predicted)
            self._n["predicted_used"] += len(predicted.intersection(used))
            self._n["used"] += len(used)

    def drain(self) -> None:
        """Wait for every prefetch in flight (tests, shutdown)."""
        while True:
            with self._lock:
                futs = list(self._pending.values())
            if not futs:
                break
            for f in futs:
                f.result()
        if self.cuda:
            self._copy_stream.synchronize()

    def close(self) -> None:
        self.drain()
        self._worker.shutdown(wait=True)

    def stats(self) -> ExpertStats:
        with self._lock:
            n = self._n
            return ExpertStats(
                tier=self.store.tier,
                policy=self.policy,
                capacity=self.capacity,
                slot_bytes=self.slot_bytes,
                resident=len(self._slot_of),
                hits=tuple(tuple(r) for r in self._hits),
                misses=tuple(tuple(r) for r in self._misses),
                bytes_transferred=n["bytes"],
                loads=n["loads"],
                streamed=n["streamed"],
                cpu_computed=n["cpu"],
                prefetch_issued=n["issued"],
                prefetch_useful=n["useful"],
                prefetch_late=n["late"],
                prefetch_wasted=n["wasted"],
                predicted=n["predicted"],
                predicted_used=n["predicted_used"],
                used=n["used"],
            )


class LayerExperts:
    """One MoE layer's view of the expert cache, held by `layers.Experts` as its ``bank``.

    ``next`` (set while the model loads) is the next MoE layer's (LayerExperts, Router): this
    layer's input run through that router predicts what the next layer will need.
    """

    def __init__(self, cache: ExpertCache, layer: int):
        self.cache, self.layer = cache, layer
        self.next: tuple[LayerExperts, object] | None = None
        self.predicted: set[int] | None = None  # set by the previous layer's look-ahead

    def acquire(self, experts: list[int], tokens: list[int]) -> Acquired:
        if self.predicted is not None:
            self.cache.note_prediction(self.predicted, experts)
            self.predicted = None
        return self.cache.acquire(self.layer, experts, tokens)

    def release(self, acquired: Acquired) -> None:
        self.cache.release(acquired)

    def prefetch_next(self, x: torch.Tensor) -> None:
        """Predict and start loading the next MoE layer's experts for hidden states x [T, D]."""
        if self.next is None or not self.cache.prefetch_enabled:
            return
        nxt, router = self.next
        _, ids = router(x)  # [T, K]
        counts = torch.bincount(ids.reshape(-1), minlength=self.cache.store.num_experts)
        order = torch.argsort(counts, descending=True, stable=True)
        wanted = [int(e) for e in order[: int((counts > 0).sum())].tolist()]
        nxt.predicted = set(wanted)
        self.cache.prefetch(nxt.layer, wanted[: self.cache.capacity])

    def fused_ids(self, ids: torch.Tensor, acquired: Acquired) -> torch.Tensor | None:
        """ids [T, K] remapped to slot indices when every expert sits in a slot, else None."""
        if len(acquired.slots) != len(acquired.weights):
            return None
        table = torch.full((self.cache.store.num_experts,), -1, dtype=torch.long)
        for e, s in acquired.slots.items():
            table[e] = s
        return table.to(ids.device)[ids]


def slot_kernel(cache: ExpertCache, on_cpu: bool = False):
    """(x, weights, slot_ids) -> routed-expert output of one fused kernel over the cache's slot
    pool, for unquantized or int4 experts: Triton on CUDA, the kernels' torch references on CPU
    (only with ``on_cpu``, for tests: the per-expert loop is the CPU path). None where it does
    not apply; the per-expert loop runs then."""
    if cache.fmt.method not in ("none", "int4") or (cache.device.type != "cuda" and not on_cpu):
        return None
    if cache.fmt.method == "none":
        from kernels import ops

        gu, dn = cache.pools["gate_up"], cache.pools["down"]
        return lambda x, weights, ids: ops.fused_moe(x, gu, dn, ids, weights)
    from runtime.weights.quant import Int4Stack, int4_group, int4_moe_op

    f, p = cache.fmt, cache.pools
    packed = [
        _int4_packed(p, part, k, int4_group(k)) for part, k in (("gate_up", f.d), ("down", f.i))
    ]
    return int4_moe_op(Int4Stack(packed[0]), Int4Stack(packed[1]))


def _int4_packed(pools: dict, part: str, k: int, group: int):
    from kernels.int4_moe import Int4Packed

    return Int4Packed(pools[f"{part}.q"], pools[f"{part}.scales"], pools[f"{part}.zeros"], k, group)
