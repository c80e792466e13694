"""The contenders of `kvscope bench`: kvscope's engine and transformers, driven the same way.

Each runner's `run(prompts, n)` generates exactly `n` greedy tokens for every prompt of a batch of
same-length prompts (no padding) and returns a RunResult with the time to the first token of the
whole batch (prefill), the time of the remaining n - 1 decode steps and the tokens.

transformers variants: `experts_implementation` eager / grouped_mm / batched_mm with the default
dynamic cache, and optionally static cache + torch.compile (grouped_mm). The peer model's
generation config has its EOS removed, so `min_new_tokens == max_new_tokens` produces exactly n
tokens without suppressing any logit (kvscope runs with ignore_eos, which does not suppress EOS
either): greedy tokens are then comparable one to one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from runtime.errors import KvscopeError

EAGER = "eager"
HF_VARIANTS = (EAGER, "grouped_mm", "batched_mm")
COMPILE_VARIANT = "static+compile"
HF_CLASSES = {"glm_moe_dsa": "GlmMoeDsaForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}


@dataclass
class RunResult:
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_s: float  # start -> every sequence has its first token's logits
    decode_s: float  # the remaining new_tokens - 1 steps
    tokens: list[list[int]]
    decode_cpu_s: float | None = 0.0  # process CPU time of the decode steps; None: unknown
    extra: dict = field(default_factory=dict)  # kvscope: cached_tokens, expert_hit_rate

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1
        return self.batch * steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def decode_tok_cpu_s(self) -> float | None:
        """Tokens per second of process CPU time: what neighbours on a shared machine cannot
        slow down (time spent descheduled is not counted). None where not measured."""
        steps, cpu = self.new_tokens - 1, self.decode_cpu_s
        if cpu is None:
            return None
        return self.batch * steps / cpu if steps > 0 and cpu > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class KvscopeRunner:
    name = "kvscope"

    def __init__(self, model_dir: str | Path, config, max_batch: int, prompt_len: int):
        from runtime.engine import Engine

        # The whole batch's prompts prefill in one step, as transformers' one forward does.
        config = replace(
            config,
            max_batch_tokens=max(config.max_batch_tokens, max_batch * prompt_len),
            max_running=max(config.max_running, max_batch),
        )
        self.engine = Engine(model_dir, config)
        self.device = self.engine.device
        self.dtype = self.engine.dtype
        self.expert_cache = getattr(self.engine.weight_plan, "cache", None)

    def _expert_counts(self) -> tuple[int, int]:
        if self.expert_cache is None:
            return 0, 0
        st = self.expert_cache.stats()
        return st.total_hits, st.total_misses

    def run(self, prompts: list[list[int]], n: int) -> RunResult:
        eng = self.engine
        hits0, miss0 = self._expert_counts()
        graph = eng.cpu_graph
        eager0 = graph.steps_eager if graph is not None else 0
        t0 = time.perf_counter()
        reqs = [
            eng.request(eng.submit(prompt_ids=p, max_new_tokens=n, ignore_eos=True))
            for p in prompts
        ]
        while any(r.first_token_at is None and not r.done for r in reqs):
            eng.step()
        t1, c1 = time.perf_counter(), time.process_time()
        while any(not r.done for r in reqs):
            eng.step()
        t2, c2 = time.perf_counter(), time.process_time()
        specs = [r.spec for r in reqs if r.spec is not None]  # speculative decoding stats
        for r in reqs:
            if r.status != "finished" or len(r.output_ids) != n:
                why = "; ".join(r.violations) or r.finish_reason
                raise KvscopeError(f"bench: kvscope request ended with {r.status} ({why})")
            eng.forget(r.request_id)  # keep the engine's table small across repeats
        extra = {
            "cached_tokens": {
                t: sum(r.cached_tokens.get(t, 0) for r in reqs) for t in ("L1", "L2", "L3")
            }
        }
        if specs:
            extra["accept"] = {
                k: sum(getattr(x, k) for x in specs) for k in ("steps", "drafted", "accepted")
            }
        if graph is not None:  # decode steps that ran eagerly while their bucket compiled
            extra["decode_steps_eager"] = graph.steps_eager - eager0
        if self.expert_cache is not None:
            hits, miss = self._expert_counts()
            hits, miss = hits - hits0, miss - miss0
            extra["expert_hit_rate"] = hits / (hits + miss) if hits + miss else None
        toks = [r.output_ids for r in reqs]
        return RunResult(len(prompts), len(prompts[0]), n, t1 - t0, t2 - t1, toks, c2 - c1, extra)

    def close(self) -> None:
        if not getattr(self, "_closed", False):
            self._closed = True
            self.engine.close()


class HFRunner:
    """One transformers model; `variant` picks its experts implementation (or static+compile)."""

    def __init__(
        self,
        model_dir: str | Path,
        arch: str,
        dtype: torch.dtype,
        device,
        variant: str,
        compile_backend: str = "inductor",  # gpu-check's CPU rehearsal: "eager" (no C++ build)
    ):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        cls = getattr(transformers, HF_CLASSES[arch])
        self.device = torch.device(device)
        self.model = cls.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        self.model.generation_config.eos_token_id = None  # see the module docstring
        self.variant = variant
        self.compiled = variant == COMPILE_VARIANT
        self.compile_backend = compile_backend
        impl = "grouped_mm" if self.compiled else variant
        self.model.set_experts_implementation(impl)
        self.attn = self.model.config._attn_implementation

    def set_variant(self, variant: str) -> None:
        if variant == self.variant:
            return
        if self.compiled or variant == COMPILE_VARIANT:
            raise ValueError("the static+compile variant runs on its own model instance")
        self.model.set_experts_implementation(variant)
        self.variant = variant

    def run(self, prompts: list[list[int]], n: int) -> RunResult:
        from transformers import (
            CompileConfig,
            GenerationConfig,
            LogitsProcessor,
            LogitsProcessorList,
        )

        device = self.device
        stamps: list[float] = []
        cpu: list[float] = []

        class Stamp(LogitsProcessor):  # called once per forward, before the token is chosen
            def __call__(self, input_ids, scores):
                _sync(device)
                stamps.append(time.perf_counter())
                cpu.append(time.process_time())
                return scores

        kw = {}
        if self.compiled:
            kw = dict(
                cache_implementation="static",
                compile_config=CompileConfig(
                    mode="default", dynamic=False, backend=self.compile_backend
                ),
            )
            kw["compile_config"]._compile_all_devices = True
        gc = GenerationConfig(
            do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw
        )
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        _sync(device)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=gc,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
            _sync(device)
        new = out[:, ids.shape[1] :].tolist()
        if len(stamps) != n or any(len(t) != n for t in new):
            raise KvscopeError(f"bench: transformers produced {len(stamps)} steps, expected {n}")
        prefill, decode = stamps[0] - t0, stamps[-1] - stamps[0]
        return RunResult(len(prompts), len(prompts[0]), n, prefill, decode, new, cpu[-1] - cpu[0])


def agreement(a: list[int], b: list[int]) -> dict:
    """Greedy agreement of two token lists: matching prefix and matching positions."""
    prefix = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return {
        "tokens": len(a),
        "matching": same,
        "first_divergence": None if prefix == len(a) else prefix,
    }


class Prompts:
    """Fresh same-length prompts for every run: run i gets prompts(i) for every contender."""

    def __init__(self, seed: int, vocab: int, length: int):
        self.seed, self.vocab, self.length = seed, vocab, length
        self.lo = min(8, vocab - 1)  # keep clear of the special tokens at the start

    def __call__(self, i: int, batch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randint(self.lo, self.vocab, (batch, self.length), generator=g).tolist()


def serial(r: RunResult) -> dict:
    out = {k: getattr(r, k) for k in ("prefill_s", "decode_s", "decode_cpu_s")}
    out.update(prefill_tok_s=r.prefill_tok_s, decode_tok_s=r.decode_tok_s)
    return {**out, "decode_tok_cpu_s": r.decode_tok_cpu_s, **r.extra}


def engine_rate(engine) -> float | None:
    """The engine's own decode rate (its last decode step), a cross-check of ours."""
    try:
        return float(engine.snapshot().decode_tok_per_s)
    except Exception:  # noqa: BLE001 - telemetry must never fail the benchmark
        return None


def select(runner, contender: str):
    if contender not in ("kvscope", "llama.cpp", COMPILE_VARIANT):
        runner.set_variant(contender)
    return runner
