"""A simulated engine over the real KV-tier library: exact KV oracle, no model.

The "model" writes, for position p of a sequence, planes whose values are a function of the
token prefix tokens[: p + 1] (a rolling hash), and "attends" by reading every stored position of
every layer and plane after the layer's fence, comparing each value with the oracle. The next
token is a function of the sum of everything read, so a single wrong value changes the output:
a request's tokens equal its idle-engine reference exactly when every read it used was right.
"""

from __future__ import annotations

import pytest
import torch

from runtime.kv.allocator import PageAllocator, PageState
from runtime.kv.copy_engine import CopyEngine, CopyHooks
from runtime.kv.disk_store import DiskStore
from runtime.kv.host_pool import HostPool, plane_specs
from runtime.kv.radix import RadixTree
from runtime.kv.tier_controller import TierController
from runtime.scheduler import Scheduler, StepOutput

PLANES = {"latent": (3,), "index_k": (2,)}  # plane name -> tail
VOCAB = 50
STOP = 0  # token id that ends a request
_MOD = (1 << 31) - 1


def _prefix_hashes(tokens: list[int], upto: int, cache: list[int]) -> list[int]:
    h = cache[-1] if cache else 7
    for tok in tokens[len(cache) : upto]:
        h = (h * 1_000_003 + tok + 1) % _MOD
        cache.append(h)
    return cache


def kv_values(hashes: torch.Tensor, layer: int, k: int, width: int) -> torch.Tensor:
    """Oracle: planes of positions with prefix hashes `hashes` [T] -> float32 [T, width]."""
    salt = torch.arange(width, dtype=torch.int64) * 15_485_863 + layer * 7919 + k * 104_729
    return ((hashes[:, None] ^ salt[None, :]) % 8191).to(torch.float32)


def next_token(total: float, length: int) -> int:
    return (int(total) * 31 + length) % VOCAB


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Sim:
    def __init__(
        self,
        *,
        num_layers: int = 2,
        page_size: int = 4,
        l1_slots: int = 16,
        l2_slots: int = 0,
        disk_dir=None,
        disk_pages: int = 64,
        policy: str = "write_through",
        threaded: bool = False,
        hooks: CopyHooks | None = None,
        max_batch_tokens: int = 32,
        max_running: int = 8,
        preempt: str = "recompute",
        unsafe: bool = False,
        fingerprint: str = "sim-model-v1",
        device: str = "cpu",
    ) -> None:
        self.L, self.P = num_layers, page_size
        self.clock = Clock()
        self.planes = {
            name: torch.zeros(num_layers, l1_slots, page_size, *tail, device=device)
            for name, tail in PLANES.items()
        }
        self.device = torch.device(device)
        specs = plane_specs(self.planes)
        self.alloc = PageAllocator(l1_slots, page_size, unsafe=unsafe)
        self.tree = RadixTree(page_size)
        self.copier = CopyEngine(num_layers, device, threaded=threaded, hooks=hooks)
        self.host = None
        if l2_slots:
            self.host = HostPool(specs, num_layers, l2_slots, page_size, pin=device != "cpu")
        self.disk = None
        if disk_dir is not None:
            budget = disk_pages * (self.host.bytes_per_page + 1024)
            self.disk = DiskStore(disk_dir, budget, fingerprint, page_size, (0, num_layers), specs)
        self.tiers = TierController(
            self.alloc, self.tree, self.copier, self.planes, self.host, self.disk, policy
        )
        self.sched = Scheduler(self.tiers, max_batch_tokens, max_running, preempt, self.clock)
        self.prompts: dict[str, tuple[list[int], int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}
        self.cached: dict[str, dict[str, int]] = {}
        self.bad_reads = 0  # reads that saw a wrong value (their tokens must not be emitted)
        self.corrupt_emitted = 0
        self.epoch_violations = 0
        self._hashes: dict[str, list[int]] = {}

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, rid: str, prompt: list[int], max_new: int, timeout_s=None) -> bool:
        try:
            self.sched.submit(rid, prompt, max_new, (STOP,), timeout_s)
        except ValueError:
            return False
        self.prompts[rid] = (list(prompt), max_new)
        self.outputs[rid] = []
        return True

    def abort(self, rid: str) -> None:
        out = self.sched.abort(rid)
        if out is not None:
            self._record([out])

    def _record(self, outs: list[StepOutput]) -> None:
        for o in outs:
            if o.token_id is not None:
                self.outputs[o.request_id].append(o.token_id)
            if o.finished:
                self.reasons[o.request_id] = o.finish_reason

    # ---- one engine step ----------------------------------------------------------------------
    def forward(self, batch) -> tuple[dict[str, int], set[str]]:
        """Write and read every scheduled sequence; returns sampled tokens and bad readers."""
        sampled, bad = {}, set()
        P = self.P
        for w in batch.seqs:
            seq = self.sched.get(w.request_id)  # None: aborted while the step was in flight
            tokens = self.prompts[w.request_id][0] + self.outputs[w.request_id]
            if seq is not None:
                self.cached[w.request_id] = dict(seq.cached)
            cache = self._hashes.setdefault(w.request_id, [])  # tokens only ever grow
            hashes = torch.tensor(_prefix_hashes(tokens, w.stop, cache)[: w.stop])
            table = torch.tensor(w.page_table, device=self.device)
            pos = torch.arange(w.stop, device=self.device)
            rows_new = table[pos[w.start :] // P] * P + pos[w.start :] % P
            rows_all = table[pos // P] * P + pos % P
            for slot, epoch in zip(w.page_table, w.epochs, strict=True):
                if seq is not None and not self.alloc.validate(slot, epoch, w.request_id):
                    self.epoch_violations += 1
            total = 0.0
            for layer in range(self.L):
                for k, (name, (width,)) in enumerate(PLANES.items()):
                    flat = self.planes[name][layer].view(-1, width)
                    want = kv_values(hashes, layer, k, width).to(self.device)  # [stop, width]
                    flat.index_copy_(0, rows_new, want[w.start :])
                if seq is None:  # the late write landed; an engine reads nothing for it
                    continue
                self.tiers.wait_layer(w.page_table, layer)  # the accessor waits on the fence
                for k, (name, (width,)) in enumerate(PLANES.items()):
                    got = self.planes[name][layer].view(-1, width).index_select(0, rows_all)
                    want = kv_values(hashes, layer, k, width).to(self.device)
                    if not torch.equal(got, want):
                        bad.add(w.request_id)
                    total += float(got.double().sum())
            if w.sample and seq is not None:
                sampled[w.request_id] = next_token(total, w.stop)
        self.bad_reads += len(bad)
        return sampled, bad

    def run_step(self) -> list[StepOutput]:
        batch = self.last_batch = self.sched.step()
        self._record(list(batch.ended))
        sampled, bad = self.forward(batch)
        outs = self.sched.commit(batch, sampled)
        for o in outs:
            if o.request_id in bad and o.token_id is not None:
                self.corrupt_emitted += 1
        self._record(outs)
        return outs

    def run_until_idle(self, max_steps: int = 1500) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work():
                break
            self.run_step()
            if not self.copier.threaded:
                self.copier.wait_idle()
        else:
            raise AssertionError("engine did not finish")
        self.tiers.drain()

    # ---- oracle -------------------------------------------------------------------------------
    def reference(self, prompt: list[int], max_new: int) -> list[int]:
        """What the request produces alone on an idle engine (no cache at all)."""
        tokens, out, cache, total = list(prompt), [], [], 0.0
        done = 0
        while len(out) < max_new:
            hashes = torch.tensor(_prefix_hashes(tokens, len(tokens), cache))
            for layer in range(self.L):
                for k, (width,) in enumerate(PLANES.values()):
                    total += float(kv_values(hashes[done:], layer, k, width).double().sum())
            done = len(tokens)
            tok = next_token(total, len(tokens))
            out.append(tok)
            tokens.append(tok)
            if tok == STOP:
                break
        return out

    def check_completed(self) -> int:
        """Every request that finished normally produced its reference tokens."""
        n = 0
        for rid, reason in self.reasons.items():
            if reason in ("stop", "length"):
                prompt, max_new = self.prompts[rid]
                assert self.outputs[rid] == self.reference(prompt, max_new), rid
                n += 1
        assert self.corrupt_emitted == 0
        assert self.epoch_violations == 0
        return n

    def check_quiescent(self) -> None:
        """Invariant 5 after every request finished and every transfer drained."""
        self.sched.check_invariants()
        assert not self.sched.has_work()
        assert self.tiers.transfers_in_flight == 0
        for rec in self.alloc.records:
            assert rec.state in (PageState.FREE, PageState.CACHED), rec
            assert rec.refcount == 0 and not rec.writers
        for node in self.tree.nodes():
            assert node.lock_ref == 0 and node.pending == 0

    def close(self) -> None:
        self.copier.close()


@pytest.fixture(scope="session")
def sim_cls():
    return Sim
