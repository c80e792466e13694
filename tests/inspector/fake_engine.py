"""FakeEngine: a deterministic TEST DOUBLE of the engine API, for inspector tests (tests only).

It produces words from a fixed list and simulates the KV bookkeeping the inspector draws: L1 page
slots moving FREE -> WRITING -> READY -> CACHED (DRAINING on abort, LOADING on a hit in L2/L3),
shared prefix pages (refcount > 1), write-through copies to L2 spilling into L3, evictions, and
integrity verdicts/events drawn from a seeded RNG, and (with ``draft_tokens``) speculative
decode steps: each emits the drafts a seeded RNG accepted, tagged "accepted", then the target's
token tagged "target" with the step's rejected count; per-request accept length / rate in
snapshots; the acceptance detector's "acceptance" events and suspect verdicts. Time is virtual
(`step_time_s` per step), so every number it reports is reproducible. It models nothing about
real inference.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from runtime.telemetry import (
    EngineSnapshot,
    IntegrityEvent,
    PageInfo,
    RadixSummary,
    RequestInfo,
    TierUsage,
    TokenEvent,
    TokenVerdict,
)

WORDS = (
    "the cache keeps every page of the sequence close to the device while the scheduler "
    "batches requests and the experts wake up only when their tokens arrive so memory moves "
    "between tiers in small verified steps and nothing is read before its fence completes"
).split()
_ROLE_IDS = {"system": 1, "user": 2, "assistant": 3, "tool": 4}


def _h64(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_VOCAB: dict[int, str] = {i: f"<{role}>" for role, i in _ROLE_IDS.items()}


def _word_id(word: str) -> int:
    token_id = 16 + _h64("w", word) % 50_000
    _VOCAB.setdefault(token_id, word)
    return token_id


def _text_ids(text: str) -> list[int]:
    return [_word_id(w) for w in text.split()]


def _preview(ids: list[int], words: int = 6) -> str:
    text = " ".join(_VOCAB.get(i, f"<{i}>") for i in ids[:words])
    return text + (" ..." if len(ids) > words else "")


@dataclass
class _Page:
    slot: int
    state: str = "FREE"
    owners: list[str] = field(default_factory=list)
    epoch: int = 0
    tokens: int = 0
    key: int | None = None  # chained prefix hash once the page is full
    checksum: str | None = None
    last_use: int = 0


@dataclass
class _Request:
    rid: str
    ids: list[int]  # prompt ids, then generated ids
    prompt_len: int
    target_len: int
    stop: list[str]
    submit_t: float
    status: str = "waiting"
    pages: list[int] = field(default_factory=list)
    written: int = 0  # KV positions written
    text: str = ""
    generated: int = 0
    cached: dict[str, int] = field(default_factory=lambda: {"L1": 0, "L2": 0, "L3": 0})
    first_t: float | None = None
    last_t: float | None = None
    verdict: str = "ok"
    spec: tuple[int, int, int] | None = None  # (verify steps, drafted, accepted)
    accept_flagged: bool = False


_VERDICT_RANK = {"ok": 0, "suspect": 1, "corrupt": 2}


class FakeEngine:
    """Deterministic engine double implementing `EngineProtocol`. Thread-safe (one lock)."""

    def __init__(
        self,
        seed: int = 0,
        *,
        page_size: int = 16,
        l1_pages: int = 96,
        l2_pages: int = 128,
        l3_pages: int = 512,
        page_bytes: int = 64 * 1024,
        prefill_chunk: int = 64,
        step_time_s: float = 0.02,
        step_delay_s: float = 0.0,
        suspect_rate: float = 0.05,
        corrupt_rate: float = 0.02,
        inject: str | None = None,
        expert_layers: int = 4,
        experts: int = 16,
        ranks: int = 2,
        min_reply: int = 12,
        max_reply: int = 40,
        draft_tokens: int = 0,
        accept_p: float = 0.7,
        accept_min_length: float = 1.4,
        accept_after: int = 128,
    ) -> None:
        self.seed = seed
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.prefill_chunk = prefill_chunk
        self.step_time_s = step_time_s
        self.step_delay_s = step_delay_s
        self.suspect_rate = suspect_rate
        self.corrupt_rate = corrupt_rate
        self.inject = inject
        self.min_reply, self.max_reply = min_reply, max_reply
        # speculative decoding: k drafts a step, each accepted with probability accept_p while
        # the previous ones were; the acceptance detector's length threshold and start
        self.draft_tokens, self.accept_p = draft_tokens, accept_p
        self.accept_min_length, self.accept_after = accept_min_length, accept_after
        self._caps = {"L1": l1_pages, "L2": l2_pages, "L3": l3_pages}
        self._lock = threading.Lock()
        self._clock = 0.0
        self._steps = 0
        self._next_id = 0
        self._pages = [_Page(slot=i) for i in range(l1_pages)]
        self._radix: dict[int, int] = {}  # page key -> L1 slot holding it (READY or CACHED)
        self._prefixes: dict[int, tuple[int, str]] = {}  # page key -> (prefix tokens, preview)
        self._l2: OrderedDict[int, str] = OrderedDict()  # key -> checksum
        self._l3: OrderedDict[int, str] = OrderedDict()
        self._to_l2: list[int] = []  # slots whose write-through copy is in flight
        self._hits = {"L1": 0, "L2": 0, "L3": 0}
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._events: list[IntegrityEvent] = []
        self._evictions = 0
        self._drained = 0
        self._tokens_total = 0
        self._recent: list[tuple[int, int]] = []  # (prefill tokens, decode tokens) per step
        self._heat = [[0] * experts for _ in range(expert_layers)]
        per_rank = math.ceil(expert_layers / ranks) if ranks > 1 else 0
        self._layer_owners = tuple(
            tuple(range(r * per_rank, min(expert_layers, (r + 1) * per_rank)))
            for r in range(ranks if ranks > 1 else 0)
        )

    # ----------------------------------------------------------------- API
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
        if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
            raise ValueError("give exactly one of prompt, messages, prompt_ids")
        if messages is not None:
            ids: list[int] = []
            for m in messages:
                ids += [_ROLE_IDS.get(m.get("role", "user"), 5)] + _text_ids(m["content"])
            ids.append(_ROLE_IDS["assistant"])
        elif prompt is not None:
            ids = _text_ids(prompt) or [0]
        else:
            ids = list(prompt_ids or [0])
        with self._lock:
            rid = request_id or f"req-{self._next_id}"
            self._next_id += 1
            if rid in self._requests:
                raise ValueError(f"duplicate request id {rid!r}")
            rng = random.Random(f"{self.seed}:{rid}:len")
            target = min(max_new_tokens, rng.randint(self.min_reply, self.max_reply))
            need = self._pages_for(len(ids) + target)
            if need > len(self._pages):
                raise ValueError(f"request needs {need} pages, the L1 pool has {len(self._pages)}")
            self._requests[rid] = _Request(rid, ids, len(ids), target, stop or [], self._clock)
            return rid

    def has_work(self) -> bool:
        with self._lock:
            return self._busy()

    def abort(self, request_id: str) -> None:
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.status in ("finished", "aborted"):
                return
            req.status = "aborted"
            self._release(req, aborted=True)

    def step(self) -> list[TokenEvent]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        with self._lock:
            if not self._busy():
                return []
            self._clock = round(self._clock + self.step_time_s, 9)
            self._steps += 1
            self._land_copies()
            self._admit()
            events: list[TokenEvent] = []
            prefill = decode = 0
            for req in list(self._requests.values()):
                if req.status == "prefill":
                    n = min(self.prefill_chunk, req.prompt_len - req.written)
                    self._write_kv(req, n)
                    prefill += n
                    if req.written == req.prompt_len:
                        req.status = "decode"
                        events.append(self._emit(req))
                        decode += 1
                elif req.status == "decode" and self.draft_tokens:
                    got = self._verify_step(req)
                    events += got
                    decode += len(got)
                elif req.status == "decode":
                    self._write_kv(req, 1)  # KV of the previous token
                    events.append(self._emit(req))
                    decode += 1
            self._heat_step(prefill + decode)
            self._recent = (self._recent + [(prefill, decode)])[-10:]
            return events

    def snapshot(self) -> EngineSnapshot:
        with self._lock:
            return self._snapshot()

    def model_info(self) -> dict[str, str]:
        return {
            "model": "fake-moe (FakeEngine test double)",
            "arch": "glm_moe_dsa",
            "device": "cpu",
            "dtype": "float32",
            "layers": str(len(self._heat)),
            "experts": str(len(self._heat[0]) if self._heat else 0),
            "page size": str(self.page_size),
            "seed": str(self.seed),
        }

    # ------------------------------------------------------------ internals
    def _busy(self) -> bool:
        active = ("waiting", "prefill", "decode")
        return (
            any(r.status in active for r in self._requests.values())
            or bool(self._to_l2)
            or any(p.state in ("WRITING", "DRAINING", "LOADING") for p in self._pages)
        )

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _page_keys(self, ids: list[int]) -> list[int]:
        keys, parent = [], 0
        for i in range(len(ids) // self.page_size):
            parent = _h64(parent, tuple(ids[i * self.page_size : (i + 1) * self.page_size]))
            keys.append(parent)
        return keys

    def _land_copies(self) -> None:
        """Finish last step's writes, loads, drains and write-through copies."""
        for slot in self._to_l2:
            p = self._pages[slot]
            if p.key is not None and p.state in ("READY", "CACHED"):
                self._store(p.key, p.checksum or "")
        self._to_l2 = []
        for p in self._pages:
            if p.state == "DRAINING":
                self._free(p)
                self._drained += 1
            elif p.state in ("WRITING", "LOADING"):
                p.state = "READY" if p.owners else "CACHED"
                if p.tokens == self.page_size and p.key is not None:
                    p.checksum = f"{_h64('sum', p.key) & 0xFFFFFFFF:08x}"
                    self._radix[p.key] = p.slot
                    self._to_l2.append(p.slot)

    def _store(self, key: int, checksum: str) -> None:
        if key in self._l2:
            self._l2.move_to_end(key)
            return
        self._l2[key] = checksum
        while len(self._l2) > self._caps["L2"]:
            old, old_sum = self._l2.popitem(last=False)
            self._l3[old] = old_sum
            while len(self._l3) > self._caps["L3"]:
                self._l3.popitem(last=False)

    def _free(self, p: _Page) -> None:
        if p.key is not None and self._radix.get(p.key) == p.slot:
            del self._radix[p.key]
        p.state, p.owners, p.tokens, p.key, p.checksum = "FREE", [], 0, None, None
        p.epoch += 1

    def _alloc(self) -> _Page:
        free = [p for p in self._pages if p.state == "FREE"]
        if not free:
            cached = [p for p in self._pages if p.state == "CACHED"]
            assert cached, "admission guarantees a free or evictable page"
            victim = min(cached, key=lambda p: p.last_use)
            if victim.key is not None:
                self._store(victim.key, victim.checksum or "")
            self._free(victim)
            self._evictions += 1
            free = [victim]
        page = free[0]
        page.last_use = self._steps
        return page

    def _reserved(self) -> int:
        return sum(
            self._pages_for(r.prompt_len + r.target_len) - len(r.pages)
            for r in self._requests.values()
            if r.status in ("prefill", "decode")
        )

    def _admit(self) -> None:
        for req in self._requests.values():
            if req.status != "waiting":
                continue
            avail = sum(p.state in ("FREE", "CACHED") for p in self._pages) - self._reserved()
            if self._pages_for(req.prompt_len + req.target_len) > avail:
                return  # FIFO: wait for pages
            for key in self._page_keys(req.ids[: req.prompt_len - 1]):
                if key in self._radix:
                    page, tier = self._pages[self._radix[key]], "L1"
                    page.state = "READY"
                elif key in self._l2 or key in self._l3:
                    tier = "L2" if key in self._l2 else "L3"
                    page = self._alloc()
                    page.state, page.key, page.tokens = "LOADING", key, self.page_size
                else:
                    break
                page.owners.append(req.rid)
                page.last_use = self._steps
                req.pages.append(page.slot)
                req.cached[tier] += self.page_size
                self._hits[tier] += 1
            req.written = len(req.pages) * self.page_size
            req.status = "prefill"

    def _write_kv(self, req: _Request, n: int) -> None:
        keys = self._page_keys(req.ids[: req.written + n])
        for _ in range(n):
            idx = req.written // self.page_size
            if idx == len(req.pages):
                page = self._alloc()
                page.owners = [req.rid]
                req.pages.append(page.slot)
            page = self._pages[req.pages[idx]]
            page.state, page.last_use = "WRITING", self._steps
            page.tokens += 1
            req.written += 1
            if page.tokens == self.page_size:
                page.key = keys[idx]
                self._prefixes.setdefault(page.key, (req.written, _preview(req.ids)))

    def _emit(self, req: _Request, draft: str = "", rejected: int = 0) -> TokenEvent:
        index = req.generated
        rng = random.Random(f"{self.seed}:{req.rid}:{index}")
        word = rng.choice(WORDS)
        text = word if index == 0 else " " + word
        token_id = _word_id(word)
        req.ids.append(token_id)
        req.text += text
        req.generated += 1
        req.first_t = req.first_t if req.first_t is not None else self._clock
        req.last_t = self._clock
        self._tokens_total += 1
        verdict = self._verdict(req, index, rng)
        if draft:
            verdict = self._acceptance(req, replace(verdict, draft=draft, rejected=rejected))
        if _VERDICT_RANK[verdict.verdict] > _VERDICT_RANK[req.verdict]:
            req.verdict = verdict.verdict
        reason = None
        if req.generated >= req.target_len:
            reason = "length"
        elif any(s and s in req.text for s in req.stop):
            reason = "stop"
        if reason is not None:
            req.status = "finished"
            self._release(req, aborted=False)
        return TokenEvent(req.rid, index, token_id, text, verdict, reason is not None, reason)

    def _verify_step(self, req: _Request) -> list[TokenEvent]:
        """One speculative decode step: the accepted drafts, then the target's token."""
        k = self.draft_tokens
        rng = random.Random(f"{self.seed}:{req.rid}:spec:{req.generated}")
        accepted = 0
        while accepted < k and rng.random() < self.accept_p:
            accepted += 1
        accepted = min(accepted, req.target_len - req.generated - 1)  # no drafts past the end
        steps, drafted, acc = req.spec or (0, 0, 0)
        req.spec = (steps + 1, drafted + k, acc + accepted)
        tags = ["accepted"] * accepted + ["target"]
        events = []
        for i, tag in enumerate(tags):
            self._write_kv(req, 1)
            ev = self._emit(req, draft=tag, rejected=k - accepted if i == accepted else 0)
            events.append(ev)
            if ev.finished:
                break
        return events

    def _acceptance(self, req: _Request, verdict: TokenVerdict) -> TokenVerdict:
        """The acceptance detector: accept length below the threshold once judged."""
        if req.spec is None or req.generated < self.accept_after:
            return verdict
        steps, _, accepted = req.spec
        length = (accepted + steps) / steps
        if length >= self.accept_min_length:
            return verdict
        why = f"accept length {length:.2f} < {self.accept_min_length} (garbled output?)"
        if not req.accept_flagged:
            req.accept_flagged = True
            self._event(req.rid, "acceptance", why, ())
        worst = verdict.verdict if verdict.verdict == "corrupt" else "suspect"
        return replace(verdict, verdict=worst, reasons=(*verdict.reasons, "acceptance: " + why))

    def _verdict(self, req: _Request, index: int, rng: random.Random) -> TokenVerdict:
        pages = tuple(req.pages)
        sampled = index % 8 == 0
        shadow = (True, round(rng.uniform(0.0, 0.02), 3)) if sampled else None
        checks = len(pages) if sampled else 0
        roll = rng.random()
        if self.inject and index % 10 == 5:
            slot = pages[-1]
            self._event(req.rid, "inject", f"{self.inject} fault injected on page {slot}", (slot,))
            self._event(req.rid, self.inject, f"detected on page {slot}", (slot,))
            self._event(req.rid, "recovery", f"page {slot} recomputed; token re-run", (slot,))
            return TokenVerdict("suspect", (f"injected {self.inject}: recovered",), pages, True,
                                True, checks, shadow)  # fmt: skip
        if roll < self.corrupt_rate:
            slot = pages[rng.randrange(len(pages))]
            epoch = self._pages[slot].epoch
            why = f"epoch mismatch on page {slot} (captured {epoch}, now {epoch + 1})"
            self._event(req.rid, "epoch", why, (slot,))
            self._event(req.rid, "recovery", f"page {slot} re-read after its fence", (slot,))
            return TokenVerdict("corrupt", (why,), pages, False, True, checks, (False, 3.2))
        if roll < self.corrupt_rate + self.suspect_rate:
            delta = round(rng.uniform(0.3, 0.6), 2)
            why = f"shadow max |dlogit| {delta} > 0.25"
            self._event(req.rid, "shadow", why, pages[-1:])
            return TokenVerdict("suspect", (why,), pages, True, True, checks, (True, delta))
        return TokenVerdict("ok", (), pages, True, True, checks, shadow)

    def _event(self, rid: str, kind: str, detail: str, pages: tuple[int, ...]) -> None:
        self._events = (self._events + [IntegrityEvent(self._clock, rid, kind, detail, pages)])[
            -200:
        ]

    def _release(self, req: _Request, *, aborted: bool) -> None:
        for slot in req.pages:
            p = self._pages[slot]
            if req.rid in p.owners:
                p.owners.remove(req.rid)
            if p.owners:
                continue
            if aborted and p.state == "WRITING":
                p.state = "DRAINING"  # a writer may still land: FREE only after it acks
            elif p.tokens == self.page_size and p.key is not None and p.state == "READY":
                p.state = "CACHED"
            elif p.state == "READY":
                self._free(p)
            elif p.state == "WRITING" and p.tokens < self.page_size:
                p.state = "DRAINING"
        req.pages = []

    def _heat_step(self, tokens: int) -> None:
        if not tokens or not self._heat:
            return
        rng = random.Random(f"{self.seed}:experts:{self._steps}")
        n = len(self._heat[0])
        weights = [1.0 / (1 + e) for e in range(n)]
        for layer, row in enumerate(self._heat):
            for e in rng.choices(range(n), weights=weights, k=2):
                row[(e + 3 * layer) % n] += tokens

    def _snapshot(self) -> EngineSnapshot:
        pb, caps = self.page_bytes, self._caps
        used = {
            "L1": sum(p.state != "FREE" for p in self._pages),
            "L2": len(self._l2),
            "L3": len(self._l3),
        }
        tiers = tuple(TierUsage(t, used[t], caps[t], used[t] * pb, caps[t] * pb) for t in caps)
        pages = tuple(
            PageInfo(
                p.slot,
                p.state,
                tuple(p.owners),
                p.epoch,
                p.tokens,
                p.checksum,
                self._tiers_of(p),
            )
            for p in self._pages
        )
        requests = tuple(self._request_info(r) for r in list(self._requests.values())[-32:])
        prefixes = sorted({self._prefixes[k] for k in self._radix if k in self._prefixes})
        radix = RadixSummary(
            nodes=len(self._radix),
            cached_tokens=len(self._radix) * self.page_size,
            longest_prefixes=tuple(sorted(prefixes, key=lambda x: -x[0])[:5]),
            hits_by_tier=dict(self._hits),
        )
        window = max(1, len(self._recent)) * self.step_time_s
        return EngineSnapshot(
            time_s=self._clock,
            model="fake-moe",
            arch="glm_moe_dsa",
            device="cpu",
            page_size=self.page_size,
            tiers=tiers,
            pages=pages,
            requests=requests,
            radix=radix,
            transfers_in_flight=len(self._to_l2),
            evictions=self._evictions,
            drained_pages=self._drained,
            decode_tok_per_s=round(sum(d for _, d in self._recent) / window, 3),
            prefill_tok_per_s=round(sum(p for p, _ in self._recent) / window, 3),
            tokens_generated=self._tokens_total,
            integrity_events=tuple(self._events),
            expert_heat=tuple(tuple(row) for row in self._heat),
            layer_owners=self._layer_owners,
            extra={"write policy": "write_through", "engine": "FakeEngine"},
        )

    def _tiers_of(self, p: _Page) -> tuple[str, ...]:
        if p.state == "FREE":
            return ()
        tiers = ["L1"]
        if p.key is not None and p.key in self._l2:
            tiers.append("L2")
        if p.key is not None and p.key in self._l3:
            tiers.append("L3")
        return tuple(tiers)

    def _request_info(self, r: _Request) -> RequestInfo:
        ttft = None if r.first_t is None else round(r.first_t - r.submit_t, 6)
        rate = None
        if r.first_t is not None and r.last_t is not None and r.last_t > r.first_t:
            rate = round((r.generated - 1) / (r.last_t - r.first_t), 3)
        return RequestInfo(
            request_id=r.rid,
            status=r.status,
            prompt_tokens=r.prompt_len,
            generated_tokens=r.generated,
            cached_tokens=dict(r.cached),
            pages=len(r.pages),
            ttft_s=ttft,
            tok_per_s=rate,
            verdict=r.verdict,
            accept_length=None if r.spec is None else round((r.spec[2] + r.spec[0]) / r.spec[0], 6),
            accept_rate=None if r.spec is None else round(r.spec[2] / r.spec[1], 6),
        )
