"""Building blocks shared by both architectures: norms, dense MLP, MoE router and experts.

Dimension legend: T tokens, D hidden, E routed experts, K experts per token, I expert width.
Weights are plain tensors (no nn.Module), laid out as in the HF checkpoints ([out, in]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T + b for a plain weight tensor [out, in], or for a quantized / offloaded
    weight object that is callable as w(x) (see runtime/weights/)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    y = w(x)
    return y if b is None else y + b


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, matching the HF reference bit for bit in fp32."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@dataclass
class DenseMLP:
    gate: torch.Tensor  # [I, D]
    up: torch.Tensor  # [I, D]
    down: torch.Tensor  # [D, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.gate)) * linear(x, self.up), self.down)


@dataclass
class Router:
    """Sigmoid router with score-correction bias and group-limited top-k (DeepSeek-V3 style)."""

    weight: torch.Tensor  # [E, D]
    bias: torch.Tensor  # [E] e_score_correction_bias, fp32
    top_k: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    scaling: float

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] fp32, expert ids [T, K])."""
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid()
        choice = scores + self.bias
        n_exp = choice.shape[-1]
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, n_exp // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            keep = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, n_exp)
            choice = choice.masked_fill(keep == 0, float("-inf"))
        ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # [T, K]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids


@dataclass
class Experts:
    """Routed experts stacked per layer; only experts that received tokens run."""

    gate_up: torch.Tensor  # [E, 2I, D] gate rows first, then up
    down: torch.Tensor  # [E, D, I]

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/ids [T, K] -> [T, D]. Tokens are sorted by expert, run per
        active expert as one GEMM, weighted and scattered back (no one-hot over all experts)."""
        t, k = ids.shape
        flat_ids = ids.reshape(-1)  # [T*K]
        order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
        token_of = order // k  # [T*K] source token of each sorted assignment
        counts = torch.bincount(flat_ids, minlength=self.gate_up.shape[0]).tolist()
        xs = x[token_of]  # [T*K, D] gathered
        w_sorted = weights.reshape(-1)[order].unsqueeze(-1)  # [T*K, 1]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            gate, up = F.linear(xs[sl], self.gate_up[e]).chunk(2, dim=-1)  # [n, I] each
            out[sl] = F.linear(F.silu(gate) * up, self.down[e])
            start += n
        out = (out * w_sorted).to(x.dtype)  # weights stay fp32 as in the reference
        result = torch.zeros_like(x)
        result.index_add_(0, token_of, out)
        return result


@dataclass
class MoE:
    router: Router
    experts: Experts
    shared: DenseMLP | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        y = self.experts(x, weights, ids)
        if self.shared is not None:
            y = y + self.shared(x)
        return y
