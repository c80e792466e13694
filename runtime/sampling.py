"""Token selection: greedy, or temperature / top-k / top-p with a per-request seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError("max_new_tokens must be a positive integer")
        if self.temperature < 0:
            raise RequestError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise RequestError("top_k must be >= 0")
        return self


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else torch.seed() % (2**63))
    return g


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [N, V] -> the distributions [N, V] (fp32, CPU) that sampling draws from:
    temperature, then top-k, then top-p (temperature > 0)."""
    x = logits.float().cpu() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(x, min(p.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > p.top_p  # keep the smallest prefix reaching top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    return x.softmax(-1)


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """logits [V] fp32 -> token id."""
    if p.temperature == 0:
        return int(logits.argmax())
    probs = probabilities(logits[None], p)[0]
    return int(torch.multinomial(probs, 1, generator=gen))
