"""The engine: decode and prefill steps on the demo-shaped model, and the scheduler's own cost
(plan + batch build + sampling + streaming) with the model replaced by a stub."""

from __future__ import annotations

import pytest
import torch

from runtime.engine import Engine, EngineConfig

PROMPT = 128


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prompts(n: int, vocab: int, length: int = PROMPT) -> list[list[int]]:
    return torch.randint(8, vocab, (n, length), generator=_gen(n)).tolist()


def _engine(model_dir, **kw) -> Engine:
    return Engine(model_dir, EngineConfig(device="auto", dtype="auto", **kw))


class Decoding:
    """Keeps `batch` requests decoding: a finished request is replaced by a fresh one."""

    def __init__(self, eng: Engine, batch: int, new_tokens: int = 256):
        self.eng, self.new_tokens = eng, new_tokens
        self.prompts = _prompts(batch, eng.model_config.vocab_size)
        self.rids = [self._submit(p) for p in self.prompts]
        while any(eng.request(r).status != "decode" for r in self.rids):
            eng.step()

    def _submit(self, prompt):
        return self.eng.submit(prompt_ids=prompt, max_new_tokens=self.new_tokens, ignore_eos=True)

    def step(self):
        self.eng.step()
        for i, rid in enumerate(self.rids):
            if self.eng.request(rid).done:
                self.eng.forget(rid)
                self.rids[i] = self._submit(self.prompts[i])


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_glm5(benchmark, demo_shaped, batch):
    d = Decoding(_engine(demo_shaped), batch)
    benchmark(d.step)


def test_decode_step_glm4(benchmark, tiny_glm4_bench):
    d = Decoding(_engine(tiny_glm4_bench), 1)
    benchmark(d.step)


def test_prefill_128_cold(benchmark, demo_shaped):
    """A never-seen 128-token prompt (a repeated one would be served from the L1 prefix cache)."""
    eng = _engine(demo_shaped)
    vocab, seen = eng.model_config.vocab_size, [0]

    def prefill():
        seen[0] += 1
        prompt = torch.randint(8, vocab, (PROMPT,), generator=_gen(seen[0])).tolist()
        rid = eng.submit(prompt_ids=prompt, max_new_tokens=1, ignore_eos=True)
        while not eng.request(rid).done:
            eng.step()
        eng.forget(rid)

    benchmark(prefill)


def test_prefill_128_cached_l1(benchmark, demo_shaped):
    """The same prompt again: its first page comes from the L1 prefix cache."""
    eng = _engine(demo_shaped)
    (prompt,) = _prompts(1, eng.model_config.vocab_size)

    def prefill():
        rid = eng.submit(prompt_ids=prompt, max_new_tokens=1, ignore_eos=True)
        while not eng.request(rid).done:
            eng.step()
        eng.forget(rid)

    prefill()
    benchmark(prefill)


@pytest.mark.parametrize("batch", [1, 16])
def test_scheduler_overhead(benchmark, demo_shaped, batch):
    """step() with a stub model: what the engine adds around each forward."""
    eng = _engine(demo_shaped, max_running=16)
    vocab = eng.model_config.vocab_size
    eng.model.forward = lambda b, pool, all_logits=False: torch.zeros(len(b.seqs), vocab)
    d = Decoding(eng, batch, new_tokens=1024)
    benchmark(d.step)
