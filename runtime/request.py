"""Per-request state held by the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from runtime.sampling import SamplingParams
from runtime.tokenizer import StreamDecoder

FINISHED = ("finished", "aborted", "error")


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    decoder: StreamDecoder
    timeout_s: float | None = None
    output_ids: list[int] = field(default_factory=list)
    status: str = "waiting"  # waiting | prefill | decode | finished | aborted | error
    finish_reason: str | None = None
    # KV: page slots in sequence order; `computed` tokens have their planes stored.
    pages: list[int] = field(default_factory=list)
    computed: int = 0
    cached_tokens: dict[str, int] = field(default_factory=lambda: {"L1": 0, "L2": 0, "L3": 0})
    text: str = ""  # full generated text (stop strings removed)
    emitted_chars: int = 0  # text already streamed to the caller
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    verdict: str = "ok"
    violations: list[str] = field(default_factory=list)
    checked_tokens: int = 0
    spec: object = None  # runtime.speculative.AcceptStats while drafts are verified

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    def tok_per_s(self) -> float | None:
        if self.first_token_at is None or len(self.output_ids) < 2:
            return None
        end = self.finished_at or time.monotonic()
        dt = end - self.first_token_at
        return (len(self.output_ids) - 1) / dt if dt > 0 else None
