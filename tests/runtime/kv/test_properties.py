"""Property tests: random submit / step / abort / timeout / evict / load / corrupt sequences
against scheduler + allocator + radix tree + tier controller, with copy completions delayed and
reordered at random (manual copy engine). Every invariant is checked after every rule; at the
end every request that completed produced exactly its idle-engine reference tokens, no corrupt
token was ever emitted, and nothing leaked (invariant 5)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import torch
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from runtime.kv.copy_engine import CopyHooks

from .conftest import Sim

PREFIXES = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8], [3, 1, 4, 1, 6, 6, 6, 6, 6, 1, 1, 2]]


class KVMachine(RuleBasedStateMachine):
    sim: Sim | None = None

    @initialize(
        policy=st.sampled_from(["write_through", "write_through_selective", "write_back"]),
        page_size=st.sampled_from([2, 4]),
        l1=st.integers(5, 14),
        l2=st.sampled_from([0, 4, 12]),
        disk=st.booleans(),
        preempt=st.sampled_from(["recompute", "swap"]),
        budget=st.integers(3, 24),
        seed=st.integers(0, 2**16),
    )
    def setup(self, policy, page_size, l1, l2, disk, preempt, budget, seed):
        self.rng = random.Random(seed)
        self.tmp = tempfile.mkdtemp(prefix="kvprop-") if disk and l2 else None
        hooks = CopyHooks(pick=lambda todo: self.rng.randrange(len(todo)))  # reorder always
        self.sim = Sim(
            page_size=page_size,
            l1_slots=l1,
            l2_slots=l2,
            disk_dir=self.tmp,
            disk_pages=12,
            policy=policy,
            threaded=False,
            hooks=hooks,
            max_batch_tokens=budget,
            max_running=4,
            preempt=preempt,
        )
        self.n = 0
        for i in range(len(PREFIXES)):  # a first wave, so most examples do work
            self.submit(i, [], 2 + i, None)

    def live(self) -> list[str]:
        return [s.request_id for s in self.sim.sched.running + self.sim.sched.waiting]

    @rule(
        prefix=st.integers(0, len(PREFIXES) - 1),
        suffix=st.lists(st.integers(1, 49), max_size=6),
        max_new=st.integers(1, 10),
        timeout=st.one_of(st.none(), st.none(), st.floats(1.0, 30.0)),
    )
    def submit(self, prefix, suffix, max_new, timeout):
        self.n += 1
        self.sim.submit(f"r{self.n}", PREFIXES[prefix] + suffix, max_new, timeout)

    @rule()
    def step(self):
        self.sim.run_step()

    @rule(n=st.integers(1, 8), k=st.integers(0, 6))
    def run(self, n, k):
        """A burst of engine steps with k copy steps between them."""
        for _ in range(n):
            self.sim.run_step()
            for _ in range(k):
                self.sim.copier.step()

    @rule(l2=st.booleans())
    def flush(self, l2):
        """Push every unused page down a tier (later hits come from L2 / L3)."""
        self.sim.tiers.drain()
        self.sim.tiers.evict_l1(self.sim.alloc.num_slots)
        if l2:
            self.sim.tiers.drain()
            self.sim.tiers.evict_l2(self.sim.alloc.num_slots)

    @rule(k=st.integers(1, 12))
    def complete_copies(self, k):
        """Advance k steps of randomly chosen transfers: completions delayed and reordered."""
        for _ in range(k):
            if not self.sim.copier.step():
                break

    @precondition(lambda self: self.sim is not None and self.live())
    @rule(data=st.data())
    def abort(self, data):
        self.sim.abort(data.draw(st.sampled_from(self.live())))

    @rule(data=st.data())
    def abort_mid_step(self, data):
        """A request ends while the step that writes its pages is in flight (safe reclaim)."""
        batch = self.sim.sched.step()
        self.sim._record(list(batch.ended))
        if batch.seqs:
            victim = data.draw(st.sampled_from([w.request_id for w in batch.seqs]))
            self.sim.abort(victim)
            self.sim.sched.check_invariants()
        sampled, bad = self.sim.forward(batch)
        outs = self.sim.sched.commit(batch, sampled)
        assert not any(o.request_id in bad for o in outs if o.token_id is not None)
        self.sim._record(outs)

    @rule(dt=st.floats(0.5, 10.0))
    def tick(self, dt):
        self.sim.clock.t += dt

    @rule(n=st.integers(1, 6))
    def evict(self, n):
        self.sim.tiers.evict_l1(n)

    @precondition(lambda self: self.sim is not None and self.sim.host is not None)
    @rule(data=st.data())
    def host_bitflip(self, data):
        host = self.sim.host
        ready = [i for i, s in enumerate(host.slots) if s.state == "READY" and not s.busy]
        if ready:
            slot = data.draw(st.sampled_from(ready))
            plane = host.planes[data.draw(st.sampled_from(sorted(host.planes)))]
            words = plane.view(torch.int32)  # [L, S, P, tail] raw 32-bit words
            at = [data.draw(st.integers(0, n - 1)) for n in words[:, slot].shape]
            words[at[0], slot, at[1], at[2]] ^= 1 << 22  # a bit flip in an L2 copy

    @precondition(lambda self: self.sim is not None and self.sim.disk is not None)
    @rule(data=st.data(), truncate=st.booleans())
    def disk_corrupt(self, data, truncate):
        files = sorted(f for f in os.listdir(self.tmp) if f.endswith(".kvp"))
        if files:
            path = os.path.join(self.tmp, data.draw(st.sampled_from(files)))
            raw = bytearray(open(path, "rb").read())
            if not raw:
                return
            if truncate:
                raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
            else:
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            with open(path, "wb") as f:
                f.write(raw)

    @invariant()
    def check_all(self):
        if self.sim is not None:
            self.sim.sched.check_invariants()
            assert self.sim.corrupt_emitted == 0 and self.sim.epoch_violations == 0

    def _events(self, completed: int) -> None:
        """Coverage of the interesting paths (pytest --hypothesis-show-statistics)."""
        sim, stats = self.sim, self.sim.tiers.stats()
        event(f"completed>0: {completed > 0}")
        event(f"preempted: {sim.sched.preemptions > 0}")
        event(f"drained pages: {stats.drained_pages > 0}")
        event(f"load failure detected: {stats.load_failures > 0}")
        event(f"bad read discarded: {sim.bad_reads > 0}")
        for tier in ("L2", "L3"):
            event(f"{tier} hits: {stats.hits[tier] > 0}")
        if sim.disk is not None:
            event(f"L3 file rejected: {sim.disk.stats['rejected'] > 0}")

    def teardown(self):
        if self.sim is None:
            return
        try:
            self.sim.run_until_idle()
            self.sim.check_quiescent()
            # a second wave re-reads every prefix after pushing it down the tiers: hits come
            # from L2 / L3 (through any corruption the rules injected) and must still be exact
            self.flush(l2=self.rng.random() < 0.5)
            for i in range(len(PREFIXES)):
                self.submit(i, [7], 3, None)
            self.sim.run_until_idle()
            completed = self.sim.check_completed()
            self.sim.check_quiescent()
            self._events(completed)
        finally:
            self.sim.close()
            if self.tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)


KVMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("KV_PROP_EXAMPLES", "80")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([Phase.shrink] if os.environ.get("KV_PROP_SHRINK", "1") == "1" else []),
)
TestKVTiers = KVMachine.TestCase
