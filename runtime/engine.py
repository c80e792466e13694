"""The engine: requests in, streamed tokens out, over the tiered, paged KV cache.

Public API (thread-safe; one lock serialises every call): `submit()`, `step()`, `abort()`,
`has_work()`, `snapshot()`, `stream()`, `generate()`, `close()`; read-only views: `requests`,
`request()`, `stats`, `model_info()`.

One `step()` is the data path: schedule -> forward -> verify -> sample -> commit -> stream.
The scheduler (runtime/scheduler.py) picks each running sequence's next positions (decode
first, then prefill chunks under the token budget; prefixes are reused from L1/L2/L3),
capturing every page's epoch and registering this step as the writer of the pages it writes.
The model stores the new tokens' planes and reads its context through the pool accessor, which
waits on load fences. The reads are verified, tokens sampled, `commit()` acks the step's writes
(only now can a page of an aborted request leave DRAINING) and verifies load-backs, and the
sampled tokens are streamed. Integrity checks and fault injection are hooks at the named
points of runtime/step_hooks.py, given the KV handles, never the engine.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import torch

from runtime.cache_stack import build_kv_stack
from runtime.engine_config import EngineConfig
from runtime.errors import KvscopeError, RequestError
from runtime.integrity.monitor import IntegrityMonitor
from runtime.kv.pool import KVPool, token_rows
from runtime.model_config import ModelConfig, load_config
from runtime.models import build_model
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.prompts import encode_prompt, eos_ids
from runtime.request import Request
from runtime.sampling import SamplingParams, make_generator, sample
from runtime.snapshot import EngineStats, EngineView, build_snapshot
from runtime.speculative import AcceptStats, Drafter, accept, default_draft_tokens
from runtime.step_hooks import StepChecks, StepHandles
from runtime.telemetry import TokenEvent, TokenVerdict
from runtime.tokenizer import StreamDecoder, Tokenizer

__all__ = ["Engine", "EngineConfig"]


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, copy_hooks=None):
        self.config = c = config or EngineConfig()
        if c.page_size < 1:
            raise KvscopeError("--page-size must be >= 1")
        self.model_dir = Path(model_dir)
        self.model_config: ModelConfig = load_config(self.model_dir)
        self.device = c.resolve_device()
        self.dtype = c.resolve_dtype(self.device)
        from runtime.weights.checkpoint import Checkpoint
        from runtime.weights.placement import LoadOptions, WeightPlan

        ckpt = Checkpoint(self.model_dir)
        self.draft_tokens = self._draft_tokens(c)
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
                mtp_layers=1 if self.draft_tokens else 0,
            ),
            self.model_config,
            ckpt,
            self.dtype,
            self.device,
        )
        self.model = build_model(
            self.model_config,
            ckpt,
            self.dtype,
            self.device,
            self.weight_plan,
            mtp=self.draft_tokens > 0,
        )
        has_tok = (self.model_dir / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer(self.model_dir) if has_tok else None
        self.eos_ids = eos_ids(self.model_config, self.model_dir, self.tokenizer)
        ic = c.integrity if not c.unsafe else replace(c.integrity, protections=False)
        self.monitor = IntegrityMonitor(ic)
        self.kv = build_kv_stack(
            self.model_config,
            c,
            self.model_dir,
            self.dtype,
            self.device,
            copy_hooks or self.monitor.faults.copy_hooks(),
            kv_layers=self.model.kv_layers,
            mtp_lookahead=max(1, self.draft_tokens) if self.draft_tokens else 0,
        )
        self.pool, self.sched = self.kv.pool, self.kv.sched
        self.sched.max_positions = self.model_config.max_position_embeddings
        kv = self.kv
        handles = StepHandles(
            kv.pool, kv.alloc, kv.tiers, kv.host, kv.disk, self.sched.get, c.page_size, self.device
        )
        self.monitor.attach(
            handles, self.tokenizer, self._recompute, exact=self.dtype == torch.float32
        )
        # The step hooks (runtime/step_hooks.py), called in this order at every point: the
        # injector first, so its late writes land before the monitor re-hashes and invalidates.
        self.hooks = (self.monitor.faults, self.monitor)
        self.runner = self._runner(c)
        self.drafter = None
        if self.draft_tokens:
            self.drafter = Drafter(
                self.model, self.pool, c.page_size, self.draft_tokens, self.runner
            )
        self._lock = threading.RLock()
        self._requests: dict[str, Request] = {}
        self._active: dict[str, Request] = {}  # submitted, not finished
        self.stats = EngineStats(started=time.monotonic())
        self._view = EngineView(
            self.model_dir,
            self.model_config.arch,
            str(self.device),
            c.page_size,
            kv,
            self.tokenizer,
            MappingProxyType(self._requests),
            self.stats,
            self.monitor.events,
            self.weight_plan,
        )
        self._last_snapshot = None
        self._idle_steps = 0
        # the verify step's tags of the tokens it streams: request -> "accepted" per accepted
        # draft, then "target"; and how many drafts it rejected
        self._spec_tags: dict[str, list[str]] = {}
        self._spec_rejected: dict[str, int] = {}

    def _draft_tokens(self, c: EngineConfig) -> int:
        """Draft tokens per step: --speculative N, or auto (on with an MTP layer)."""
        has_mtp = self.model_config.num_nextn_predict_layers > 0
        if c.speculative is None:
            return default_draft_tokens(self.device) if has_mtp else 0
        if c.speculative < 0:
            raise KvscopeError(f"--speculative {c.speculative}: give a number of draft tokens >= 0")
        if c.speculative and not has_mtp:
            raise KvscopeError(
                f"--speculative {c.speculative}: {self.model_dir} has no MTP layers "
                "(num_nextn_predict_layers is 0); use --speculative 0"
            )
        return c.speculative

    # ---------------------------------------------------------------- requests
    def encode_prompt(self, prompt=None, messages=None, prompt_ids=None) -> list[int]:
        return encode_prompt(
            self.model_config, self.model_dir, self.tokenizer, prompt, messages, prompt_ids
        )

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
        budget = min(params.max_new_tokens, ctx - len(ids))  # the context bounds generation
        timeout = timeout_s if timeout_s is not None else self.config.timeout_s
        with self._lock:
            rid = request_id or uuid.uuid4().hex[:8]
            if rid in self._active:
                raise RequestError(f"request id {rid!r} is already running")
            stops = () if params.ignore_eos else tuple(self.eos_ids)
            try:
                self.sched.submit(rid, ids, budget, stops, timeout)
            except ValueError as e:
                raise RequestError(f"{e}; raise --kv-mem or lower max_new_tokens") from None
            req = Request(
                request_id=rid,
                prompt_ids=ids,
                params=params,
                generator=make_generator(params.seed),
                decoder=StreamDecoder(self.tokenizer),
                timeout_s=timeout,
            )
            self._requests[rid] = self._active[rid] = req
            return rid

    def request(self, request_id: str) -> Request:
        return self._requests[request_id]

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (long-running benches keep the table small)."""
        with self._lock:
            if request_id in self._active:
                raise RequestError(f"request {request_id!r} is still running; abort it first")
            self._requests.pop(request_id, None)

    @property
    def requests(self):
        """Every request submitted (finished ones included), by id: a read-only mapping."""
        return self._view.requests

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._active) or self.kv.tiers.transfers_in_flight > 0

    def abort(self, request_id: str, reason: str = "abort") -> list[TokenEvent]:
        """End a request now. Its pages are released through safe reclaim: a page a writer
        still targets stays DRAINING until that writer acks (invariant 1)."""
        with self._lock:
            req = self._active.get(request_id)
            if req is None:
                return []
            self.sched.abort(request_id, reason)
            return [self._finish(req, reason, status="aborted")]

    def close(self) -> None:
        """Finish transfers in flight (L2/L3 backups), stop the copy threads and the CPU
        graph's compile thread."""
        with self._lock:
            for h in self.hooks:
                h.close()
            self.kv.close()
            self.runner.close()

    # ---------------------------------------------------------------- stepping
    def _finish(self, req: Request, reason: str, status: str = "finished") -> TokenEvent:
        req.status, req.finish_reason, req.finished_at = status, reason, time.monotonic()
        self._active.pop(req.request_id, None)
        if self.drafter is not None:
            self.drafter.forget(req.request_id)
        req.pages = []
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

    def step(self) -> list[TokenEvent]:
        """One iteration: schedule -> forward -> verify -> sample -> commit -> stream."""
        with self._lock:
            batch = self.sched.step()  # schedule
            events = self._settle_unscheduled(batch)
            if not batch.seqs:
                return events + self._idle_step(batch)
            self._idle_steps = 0
            t0 = time.perf_counter()
            checks = StepChecks(pages={w.request_id: w.page_table for w in batch.seqs})
            for h in self.hooks:
                h.before_forward(batch, checks)
            fb = self._build_batch(batch.seqs)
            logits, hidden = self._forward(fb)  # forward
            for h in self.hooks:  # verify the step's reads
                h.after_forward(batch, checks)
            sampled, shadows = self._sample(batch, logits, checks)  # sample
            drafts, mtp_rows = self._draft(batch, fb, hidden, sampled, checks)  # next drafts
            outs = self.sched.commit(batch, sampled, checks.bad, mtp_rows)  # commit
            for rid, d in drafts.items():
                self.sched.set_drafts(rid, d)
            victims = [rid for h in self.hooks for rid in h.after_commit(batch, checks)]
            self._note_recoveries(checks)
            for out in outs:  # stream
                req = self._active.get(out.request_id)
                if req is not None:
                    verdict = self.monitor.verdict(
                        req.request_id, checks, shadows.get(req.request_id)
                    )
                    verdict = self._tag_draft(req.request_id, verdict)
                    events.append(self._emit(req, out.token_id, out.finish_reason, verdict))
            for victim in victims:  # an injected timeout
                if victim in self._active:
                    events += self.abort(victim, "timeout")
            self._spec_tags.clear()
            self._spec_rejected.clear()
            for h in self.hooks:
                h.end_step()
            self._mirror_scheduler(batch)
            self._note_rate(batch, time.perf_counter() - t0)
            return events

    def _tag_draft(self, rid: str, verdict: TokenVerdict) -> TokenVerdict:
        """Mark a token of a verify step: an accepted draft, or the target's own token."""
        tags = self._spec_tags.get(rid)
        if not tags:
            return verdict
        tag = tags.pop(0)
        rejected = self._spec_rejected.get(rid, 0) if tag == "target" else 0
        return replace(verdict, draft=tag, rejected=rejected)

    def _settle_unscheduled(self, batch) -> list[TokenEvent]:
        """Requests the scheduler ended (timeouts) or preempted this step."""
        events = []
        for out in batch.ended:  # timeouts
            req = self._active.get(out.request_id)
            if req is not None:
                events.append(self._finish(req, out.finish_reason or "timeout", "aborted"))
        for rid in batch.preempted:
            if rid in self._active:
                self._active[rid].status = "waiting"
        return events

    def _idle_step(self, batch) -> list[TokenEvent]:
        """Nothing to compute (waiting on transfers: L3 prefetch, drains): let them progress."""
        if self.kv.tiers.transfers_in_flight:
            self.kv.tiers.wait_progress(0.01)
        self.sched.commit(batch, {})
        for h in self.hooks:
            h.idle()
        return self._check_stall(batch)

    def _note_recoveries(self, checks: StepChecks) -> None:
        """Discarded steps (recomputed, never emitted) and load-backs that failed checksums."""
        for rid, reasons in checks.bad.items():
            if rid in self._active:
                self._active[rid].violations.append("recovered: " + "; ".join(reasons))
                for h in self.hooks:
                    h.recovered(rid, reasons)
        for rid, slot in self.sched.rolled_back:  # a tier copy failed its checksum
            if rid in self._active:
                reason = f"page {slot} loaded from L2/L3 failed its checksum"
                self._active[rid].violations.append("recovered: " + reason)
                self.monitor.event(rid, "checksum", reason, [slot])
        self.sched.rolled_back.clear()

    def _mirror_scheduler(self, batch) -> None:
        """Copy the scheduler's view of the step's sequences into their requests (telemetry)."""
        for w in batch.seqs:
            seq = self.sched.get(w.request_id)
            req = self._requests[w.request_id]
            if seq is not None:
                req.pages, req.computed = list(seq.pages), seq.computed
                req.cached_tokens = {t: (seq.cached or {}).get(t, 0) for t in ("L1", "L2", "L3")}

    def _note_rate(self, batch, dt: float) -> None:
        self.monitor.note_step(dt)
        rate = batch.num_tokens / dt if dt > 0 else 0.0
        if all(len(w.token_ids) == 1 for w in batch.seqs):
            self.stats.decode_tok_per_s = rate
        else:
            self.stats.prefill_tok_per_s = rate

    def _runner(self, c: EngineConfig):
        """The model runner (runtime/models/runner.py): eager, CUDA graphs or compiled CPU
        decode steps, keyed for sharing compiled steps across engines of this process."""
        from runtime.kv.tier_stack import model_fingerprint
        from runtime.models.runner import ModelRunner

        disk = self.kv.disk  # its fingerprint is the same hash: not computed twice
        key = (
            disk.fingerprint if disk else model_fingerprint(self.model_dir, self.dtype, c.page_size)
        )
        return ModelRunner(self.model, self.pool, c.cpu_graph, key)

    @property
    def cpu_graph(self):
        """The compiled CPU decode steps (runtime/models/cpu_graph.py), or None."""
        return self.runner.cpu_graph

    def _forward(self, fb: ForwardBatch):
        """(logits [R, V] of each sequence's last token, or of its verified drafts too; the
        final-norm hidden states [T, D] when an MTP layer drafts, else None)."""
        if self.drafter is None:
            return self.runner.forward(fb), None
        return self.runner.forward(fb, keep_hidden=True)

    def _draft(self, batch, fb, hidden, sampled, checks):
        """The MTP layer's pass after sampling (runtime/speculative.py): its rows for the
        positions now final, and the drafts each sequence verifies next step. Returns
        ({rid: drafts}, {rid: MTP rows valid})."""
        if self.drafter is None:
            return {}, {}
        after = {}
        for w in batch.seqs:
            rid = w.request_id
            if rid in checks.bad or rid not in self._active:
                continue
            if w.sample:
                if rid not in sampled:
                    continue
                got = sampled[rid]
                new = [got] if isinstance(got, int) else list(got)
                if self._finishes(rid, new):
                    continue  # nothing left to draft for
                after[rid] = self._active[rid].tokens + new
            else:
                after[rid] = self._active[rid].tokens
        return self.drafter.extend(batch, fb, hidden, after, self._active)

    def _tokens_left(self, rid: str) -> int:
        """Tokens request `rid` may still generate (>= 1 while it is scheduled)."""
        seq = self.sched.get(rid)
        return max(1, seq.max_new_tokens - len(seq.output)) if seq is not None else 1

    def _finishes(self, rid: str, new: list[int]) -> bool:
        """Do the tokens `new` end request `rid` (its length or a stop token)?"""
        seq = self.sched.get(rid)
        if seq is None:
            return True
        return len(seq.output) + len(new) >= seq.max_new_tokens or any(
            t in seq.stop_ids for t in new
        )

    def _check_stall(self, batch) -> list[TokenEvent]:
        """Never spin forever: if nothing can run, nothing is in flight and nothing will land,
        the waiting requests cannot be served; end them with an error record."""
        busy = self.kv.tiers.transfers_in_flight or any(h.busy() for h in self.hooks) or batch.ended
        self._idle_steps = 0 if busy or not self._active else self._idle_steps + 1
        if self._idle_steps < 1000:
            return []
        self._idle_steps = 0
        events = []
        for rid, req in list(self._active.items()):
            self.sched.abort(rid, "error")
            req.violations.append("stalled: no KV pages could be freed for this request")
            events.append(self._finish(req, "error", status="error"))
        return events

    def _sample(self, batch, logits, checks) -> tuple[dict[str, int], dict]:
        """Sample every finished sequence whose reads passed validation; the hooks may check a
        sampled token (shadow recompute) and discard the step if they distrust it."""
        sampled, shadows = {}, {}
        row = 0
        for w in batch.seqs:
            rid = w.request_id
            req = self._active[rid]
            rows = logits[row : row + 1 + w.n_draft]  # the last token, then one per draft
            row += 1 + w.n_draft
            req.status = "decode" if w.sample else "prefill"
            if not w.sample or rid in checks.bad:
                continue
            state = req.generator.get_state()
            ctx = req.tokens[: w.stop - w.n_draft]
            if w.n_draft:  # verify the drafts: accepted ones, then the target's token
                drafts = list(w.token_ids[len(w.token_ids) - w.n_draft :])
                probs = self.drafter.draft_probs.get(rid)
                got = accept(rows, drafts, probs, req.params, req.generator)
                # drafts verified past the request's last token (Scheduler.step): the tokens
                # it can still take, and the stats count only the drafts that could be kept
                left = self._tokens_left(rid)
                got, useful = got[:left], min(len(drafts), left - 1)
                sampled[rid] = got
                if req.spec is None:
                    req.spec = AcceptStats()
                if useful:
                    req.spec.note(useful, len(got) - 1)
                self._spec_tags[rid] = ["accepted"] * (len(got) - 1) + ["target"]
                self._spec_rejected[rid] = useful - (len(got) - 1)
                ctx, last = ctx + got[:-1], rows[len(got) - 1]
            else:
                last = rows[-1]
                sampled[rid] = sample(last, req.params, req.generator)
            for h in self.hooks:
                shadow = h.check_sample(rid, ctx, last, w.page_table, checks)
                if shadow is not None:
                    shadows[rid] = shadow
            if rid in checks.bad:  # distrusted: never emitted
                del sampled[rid]
                req.generator.set_state(state)  # the regenerated token draws the same sample
        return sampled, shadows

    def _recompute(self, tokens: list[int]) -> torch.Tensor:
        """Next-token logits [V] of `tokens` without the cache (a scratch pool): the shadow."""
        cfg, ps, n = self.model_config, self.config.page_size, len(tokens)
        pool = KVPool(cfg.num_layers, -(-n // ps), ps, cfg.plane_widths(), self.dtype, self.device)
        rows = token_rows(list(range(pool.num_slots)), 0, n, ps).to(self.device)
        batch = ForwardBatch(
            torch.tensor(tokens, device=self.device),
            torch.arange(n, device=self.device),
            rows,
            [SeqChunk(0, n, 0, rows)],
        )
        return self.model.forward(batch, pool)[0]

    def _build_batch(self, seqs) -> ForwardBatch:
        ids, pos, rows, chunks, off = [], [], [], [], 0
        ps = self.config.page_size
        for w in seqs:
            ctx_rows = token_rows(w.page_table, 0, w.stop, ps)
            start = w.start
            if w.lead_token >= 0:  # recomputed for its hidden state only: not stored
                start -= 1
                ids.append(w.lead_token)
                rows.append(torch.tensor([-1]))
            ids += w.token_ids
            pos += range(start, w.stop)
            rows.append(ctx_rows[w.start :])
            chunks.append(
                SeqChunk(
                    start,
                    w.stop,
                    off,
                    ctx_rows.to(self.device),
                    w.request_id,
                    list(w.page_table),
                    n_logits=1 + w.n_draft,
                )
            )
            off += w.stop - start
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(pos, dtype=torch.long, device=self.device),
            new_rows=torch.cat(rows).to(self.device),
            seqs=chunks,
        )

    def _emit(
        self, req: Request, tok: int, sched_reason: str | None, verdict: TokenVerdict
    ) -> TokenEvent:
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
        req.output_ids.append(tok)
        self.stats.tokens_generated += 1
        req.text += req.decoder.push(tok) if tok not in self.eos_ids else ""
        verdict = self.monitor.text_checks(req, verdict)
        reason = sched_reason  # "stop" (EOS) or "length" from the scheduler
        for s in req.params.stop:
            cut = req.text.find(s)
            if s and cut >= 0:
                req.text, reason = req.text[:cut], "stop"
        if reason is not None:
            if sched_reason is None:  # a stop string: the scheduler still runs it
                self.sched.abort(req.request_id, "stop")
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
        if not self._lock.acquire(blocking=self._last_snapshot is None):
            return self._last_snapshot
        try:
            self._last_snapshot = build_snapshot(self._view)
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
            "decode": self.runner.describe(),
            "speculative": f"MTP, {self.draft_tokens} draft tokens" if self.drafter else "off",
        }
