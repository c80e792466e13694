"""The engine: requests in, streamed tokens out, over a paged KV pool.

Public API (thread-safe; one lock serialises every call): `submit()`, `step()`, `abort()`,
`has_work()`, `snapshot()`, `stream()`, `generate()`. `step()` runs one scheduler iteration:
decode tokens first, then prefill chunks under the per-step token budget.

Page ownership (foundation allocator): a slot in `self._free` has no owner and no writer; a slot
in `req.pages` is owned by exactly that request and written only by the forward step that
computes that request's tokens. A request's slots return to the free list when it finishes,
aborts or is preempted, and only between steps (no writer can be in flight then).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.config import ModelConfig, load_config
from runtime.errors import KvscopeError, RequestError, TokenizerError
from runtime.kv.pool import KVPool, token_rows
from runtime.models import build_model
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.request import Request
from runtime.sampling import SamplingParams, make_generator, sample
from runtime.telemetry import TokenEvent, TokenVerdict
from runtime.tokenizer import StreamDecoder, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    page_size: int = 64
    kv_mem: int | None = None  # bytes for the L1 pool; None = enough for max_running contexts
    max_batch_tokens: int = 512  # prefill chunk budget per step
    max_running: int = 16
    timeout_s: float | None = None  # default per-request timeout
    # Weights (runtime/weights/placement.py, docs/quantization.md)
    quant: str = "none"  # none | nf4 | int8 | int4
    gpu_mem: int | None = None  # bytes of GPU memory for weights; None = free memory
    cpu_mem: int | None = None  # bytes of host memory for weights; None = MemAvailable
    expert_cache: str | None = None  # "N" experts | SIZE | "P%"; None = experts resident
    expert_offload: str = "auto"  # auto | host | mmap: where offloaded experts live
    expert_policy: str = "lru"  # lru | lfu
    expert_prefetch: bool = True  # prefetch the next layer's predicted experts
    expert_cpu_compute: bool = False  # cold experts on the CPU when cheaper than the copy

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise KvscopeError("--device cuda: no CUDA device is available; use --device cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise KvscopeError(f"--dtype {self.dtype}: choose auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        if self.config.page_size < 1:
            raise KvscopeError("--page-size must be >= 1")
        self.model_dir = Path(model_dir)
        self.model_config: ModelConfig = load_config(self.model_dir)
        self.device = self.config.resolve_device()
        self.dtype = self.config.resolve_dtype(self.device)
        from runtime.weights.checkpoint import Checkpoint
        from runtime.weights.placement import LoadOptions, WeightPlan

        ckpt = Checkpoint(self.model_dir)
        c = self.config
        self.weight_plan = WeightPlan(  # quantization, expert offload, fit check (may raise)
            LoadOptions(
                quant=c.quant,
                expert_cache=c.expert_cache,
                expert_offload=c.expert_offload,
                expert_policy=c.expert_policy,
                expert_prefetch=c.expert_prefetch,
                expert_cpu_compute=c.expert_cpu_compute,
                gpu_mem=c.gpu_mem,
                cpu_mem=c.cpu_mem,
            ),
            self.model_config,
            ckpt,
            self.dtype,
            self.device,
        )
        self.model = build_model(self.model_config, ckpt, self.dtype, self.device, self.weight_plan)
        has_tok = (self.model_dir / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer(self.model_dir) if has_tok else None
        self.eos_ids = self._eos_ids()
        cfg, ps = self.model_config, self.config.page_size
        probe = KVPool(cfg.num_layers, 1, ps, cfg.plane_widths(), self.dtype, "meta")
        per_seq = -(-cfg.max_position_embeddings // ps)
        slots = self.config.max_running * per_seq
        if self.config.kv_mem is not None:
            slots = self.config.kv_mem // probe.bytes_per_page
        if slots < 1:
            raise KvscopeError(f"--kv-mem too small: one page needs {probe.bytes_per_page} bytes")
        self.pool = KVPool(cfg.num_layers, slots, ps, cfg.plane_widths(), self.dtype, self.device)
        self._free: deque[int] = deque(range(slots))
        self._lock = threading.RLock()
        self._requests: dict[str, Request] = {}
        self._queue: deque[str] = deque()  # not finished, FIFO by submission
        self._started = time.monotonic()
        self._tokens_generated = 0
        self._decode_rate = 0.0
        self._prefill_rate = 0.0
        self._last_snapshot = None

    # ---------------------------------------------------------------- requests
    def _eos_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        gen = self.model_dir / "generation_config.json"
        if gen.is_file():
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id")
            except json.JSONDecodeError:
                eos = None
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def encode_prompt(self, prompt=None, messages=None, prompt_ids=None) -> list[int]:
        if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
            raise RequestError("give exactly one of 'prompt', 'messages' or 'prompt_ids'")
        if prompt_ids is not None:
            ok = isinstance(prompt_ids, list) and all(isinstance(i, int) for i in prompt_ids)
            if not ok or not prompt_ids:
                raise RequestError("'prompt_ids' must be a non-empty list of integers")
            bad = [i for i in prompt_ids if not 0 <= i < self.model_config.vocab_size]
            if bad:
                raise RequestError(f"'prompt_ids' has id {bad[0]} outside the vocabulary")
            return list(prompt_ids)
        if self.tokenizer is None:
            raise TokenizerError(
                f"{self.model_dir}: no tokenizer.json, so text prompts cannot be encoded; "
                "send 'prompt_ids' instead"
            )
        if messages is not None:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages
            ):
                raise RequestError("'messages' must be a list of {role, content} objects")
            prompt = self.tokenizer.apply_chat_template(messages)
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise RequestError("the prompt encodes to no tokens")
        return ids

    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        prompt_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
        **kw,
    ) -> str:
        """Queue a request; returns its id. Raises RequestError/TokenizerError on bad input."""
        params = (params or SamplingParams(**kw)).validate()
        ids = self.encode_prompt(prompt, messages, prompt_ids)
        ctx = self.model_config.max_position_embeddings
        if len(ids) >= ctx:
            raise RequestError(
                f"prompt is {len(ids)} tokens but the model's context is {ctx}; shorten it"
            )
        if -(-len(ids) // self.config.page_size) > self.pool.num_slots:
            raise RequestError(
                f"prompt needs {-(-len(ids) // self.config.page_size)} KV pages but the pool "
                f"has {self.pool.num_slots}; raise --kv-mem"
            )
        with self._lock:
            rid = request_id or uuid.uuid4().hex[:8]
            if rid in self._requests and not self._requests[rid].done:
                raise RequestError(f"request id {rid!r} is already running")
            self._requests[rid] = Request(
                request_id=rid,
                prompt_ids=ids,
                params=params,
                generator=make_generator(params.seed),
                decoder=StreamDecoder(self.tokenizer),
                timeout_s=timeout_s if timeout_s is not None else self.config.timeout_s,
            )
            self._queue.append(rid)
            return rid

    def request(self, request_id: str) -> Request:
        return self._requests[request_id]

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue)

    def abort(self, request_id: str, reason: str = "abort") -> list[TokenEvent]:
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.done:
                return []
            return [self._finish(req, reason, status="aborted")]

    # ---------------------------------------------------------------- stepping
    def _release(self, req: Request) -> None:
        self._free.extend(req.pages)
        req.pages = []
        req.computed = 0

    def _finish(self, req: Request, reason: str, status: str = "finished") -> TokenEvent:
        req.status, req.finish_reason, req.finished_at = status, reason, time.monotonic()
        self._release(req)
        if req.request_id in self._queue:
            self._queue.remove(req.request_id)
        tail = req.text[req.emitted_chars :]
        req.emitted_chars = len(req.text)
        return TokenEvent(
            request_id=req.request_id,
            index=len(req.output_ids) - 1,
            token_id=req.output_ids[-1] if req.output_ids else -1,
            text=tail,
            verdict=TokenVerdict(verdict=req.verdict),
            finished=True,
            finish_reason=reason,
        )

    def _grow(self, req: Request, end: int) -> bool:
        need = -(-end // self.config.page_size) - len(req.pages)
        if need > len(self._free):
            return False
        req.pages.extend(self._free.popleft() for _ in range(need))
        return True

    def _plan(self) -> tuple[list[tuple[Request, int, int]], list[TokenEvent]]:
        """Choose (request, start, end) chunks for this step; preempt when decode is stuck."""
        events: list[TokenEvent] = []
        plan: list[tuple[Request, int, int]] = []
        budget = self.config.max_batch_tokens
        active = [self._requests[r] for r in self._queue]
        running = [r for r in active if r.status == "decode"]
        planned: set[str] = set()
        preempted = False
        for req in running:
            if req.status != "decode":  # preempted by an earlier request in this loop
                continue
            start = req.computed
            while not self._grow(req, start + 1):
                # Preempt (recompute later) the youngest request holding pages that is not
                # already in this step; that may be `req` itself, which then waits.
                others = [
                    r for r in active if r.pages and r is not req and r.request_id not in planned
                ]
                if not others and not planned:
                    events.append(self._error(req, "KV pool exhausted; raise --kv-mem"))
                    break
                victim = max(others + [req], key=lambda r: r.submitted_at)
                self._release(victim)
                victim.status = "waiting"
                preempted = True
                if victim is req:
                    break
            else:
                plan.append((req, start, start + 1))
                planned.add(req.request_id)
                budget -= 1
        n_running = len(plan)
        reserve = len(plan)  # keep a page per decoding request so admission cannot starve it
        for req in active:
            if preempted:  # memory is short: no admission in a step that had to preempt
                break
            if req.status not in ("waiting", "prefill") or budget <= 0:
                continue
            if n_running >= self.config.max_running:
                break
            end = min(len(req.tokens), req.computed + budget)
            need = -(-end // self.config.page_size) - len(req.pages)
            if need + (reserve if not req.pages else 0) > len(self._free) or not self._grow(
                req, end
            ):
                continue  # admission: wait until pages free up
            plan.append((req, req.computed, end))
            req.status = "prefill"
            budget -= end - req.computed
            n_running += 1
        return plan, events

    def _error(self, req: Request, msg: str) -> TokenEvent:
        req.violations.append(msg)
        return self._finish(req, "error", status="error")

    def step(self) -> list[TokenEvent]:
        """One iteration: expire timeouts, schedule, run the model once, sample, stream."""
        with self._lock:
            events: list[TokenEvent] = []
            now = time.monotonic()
            for rid in list(self._queue):
                req = self._requests[rid]
                if req.timeout_s is not None and now - req.submitted_at > req.timeout_s:
                    events.append(self._finish(req, "timeout", status="aborted"))
            plan, stuck = self._plan()
            events += stuck
            if not plan:
                return events
            t0 = time.perf_counter()
            batch = self._build_batch(plan)
            logits = self.model.forward(batch, self.pool)
            n_new = batch.num_tokens
            for i, (req, _start, end) in enumerate(plan):
                req.computed = end
                if end == len(req.tokens):
                    req.status = "decode"
                    events.append(self._emit(req, logits[i]))
            dt = time.perf_counter() - t0
            rate = n_new / dt if dt > 0 else 0.0
            if all(end - start == 1 for _, start, end in plan):
                self._decode_rate = rate
            else:
                self._prefill_rate = rate
            return events

    def _build_batch(self, plan) -> ForwardBatch:
        ids, pos, rows, seqs, off = [], [], [], [], 0
        ps = self.config.page_size
        for req, start, end in plan:
            ctx_rows = token_rows(req.pages, 0, end, ps)
            toks = req.tokens[start:end]
            ids += toks
            pos += range(start, end)
            rows.append(ctx_rows[start:end])
            seqs.append(SeqChunk(start, end, off, ctx_rows.to(self.device), req.request_id))
            off += end - start
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(pos, dtype=torch.long, device=self.device),
            new_rows=torch.cat(rows).to(self.device),
            seqs=seqs,
        )

    def _emit(self, req: Request, logits: torch.Tensor) -> TokenEvent:
        tok = sample(logits, req.params, req.generator)
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        req.output_ids.append(tok)
        self._tokens_generated += 1
        req.text += req.decoder.push(tok) if tok not in self.eos_ids else ""
        verdict = TokenVerdict(pages=tuple(req.pages))
        reason = None
        if tok in self.eos_ids and not req.params.ignore_eos:
            reason = "stop"
        for s in req.params.stop:
            cut = req.text.find(s)
            if s and cut >= 0:
                req.text, reason = req.text[:cut], "stop"
        if reason is None and len(req.output_ids) >= req.params.max_new_tokens:
            reason = "length"
        if reason is None and len(req.tokens) >= self.model_config.max_position_embeddings:
            reason = "length"
        if reason is not None:
            return self._finish(req, reason)
        hold = max((len(s) - 1 for s in req.params.stop), default=0)  # stop may still complete
        safe = max(req.emitted_chars, len(req.text) - hold)
        delta = req.text[req.emitted_chars : safe]
        req.emitted_chars = safe
        return TokenEvent(req.request_id, len(req.output_ids) - 1, tok, delta, verdict)

    # ---------------------------------------------------------------- helpers
    def stream(self, request_id: str):
        """Yield this request's TokenEvents, driving step() until it finishes."""
        req = self._requests[request_id]
        while not req.done:
            for ev in self.step():
                if ev.request_id == request_id:
                    yield ev
        # events for the request may have been produced by another caller's step()

    def run_until_done(self) -> list[TokenEvent]:
        events = []
        while self.has_work():
            events += self.step()
        return events

    def generate(self, prompt_ids: list[int], **kw) -> list[int]:
        rid = self.submit(prompt_ids=prompt_ids, params=SamplingParams(**kw))
        while not self._requests[rid].done:
            self.step()
        return self._requests[rid].output_ids

    def snapshot(self):
        """Immutable telemetry. Never waits for a running step: while one holds the lock, the
        snapshot taken at the end of the previous call is returned."""
        from runtime.snapshot import build_snapshot

        if not self._lock.acquire(blocking=self._last_snapshot is None):
            return self._last_snapshot
        try:
            self._last_snapshot = build_snapshot(self)
            return self._last_snapshot
        finally:
            self._lock.release()

    def model_info(self) -> dict[str, str]:
        cfg = self.model_config
        return {
            "model": str(self.model_dir),
            "arch": cfg.arch,
            "layers": str(cfg.num_layers),
            "hidden": str(cfg.hidden_size),
            "experts": f"{cfg.n_routed_experts} routed, top-{cfg.num_experts_per_tok}",
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "page_size": str(self.config.page_size),
            "kv_pages": str(self.pool.num_slots),
        }
