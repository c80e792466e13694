"""Building blocks shared by both architectures: norms, dense MLP, MoE router and experts.

Dimension legend: T tokens, D hidden, E routed experts, K experts per token, I expert width.
Weights are plain tensors (no nn.Module), laid out as in the HF checkpoints ([out, in]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.backend import use_triton
from runtime.weights.linear import linear


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

    def __call__(self, x: torch.Tensor, step=None) -> torch.Tensor:
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
    """Routed experts of one layer; only experts that received tokens run.

    ``gate_up`` / ``down``: stacked tensors ([E, 2I, D] gate rows first, [E, D, I]) or any
    sequences of per-expert weights usable with linear() (quantized: runtime/weights/quant.py).
    ``fused``: optional (x, weights, ids) -> [T, D] that replaces the per-expert loop (the int4
    kernel). ``bank``: set when routed experts are offloaded (runtime/weights/expert_cache.py):
    the layer acquires its experts through the expert cache, starts the next layer's prefetch,
    and computes on whatever device each expert's weights sit (CPU for cold experts). With
    ``fused_slots`` (CUDA) a layer whose experts all sit in cache slots runs one fused kernel
    over the slot pool with ids remapped to slots.
    """

    gate_up: object
    down: object
    fused: object = None
    bank: object = None
    fused_slots: object = None

    @property
    def num_experts(self) -> int:
        return self.bank.cache.store.num_experts if self.bank is not None else len(self.gate_up)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate_up [E, 2I, D], down [E, D, I]) when the routed experts are plain resident tensors
        of one dtype (what the fused_moe kernel takes); None for quantized, offloaded or fused-op
        experts, which keep __call__."""
        gu, dn = self.gate_up, self.down
        if self.bank is not None or self.fused is not None or self.fused_slots is not None:
            return None
        if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor)):
            return None
        if gu.dim() != 3 or dn.dim() != 3 or gu.dtype != dn.dtype:
            return None
        return gu, dn

    def packed_stacks(self):
        """(gate_up, down) when the routed experts are resident packed CPU stacks
        (runtime/weights/quant_cpu.py: Int8CpuStack / Int4CpuStack), which a compiled decode
        step indexes by expert ids read inside the graph; None otherwise."""
        gu, dn = self.gate_up, self.down
        if self.bank is not None or self.fused is not None or self.fused_slots is not None:
            return None
        if getattr(gu, "expert_stack", False) and getattr(dn, "expert_stack", False):
            return gu, dn
        return None

    def fused_kernel(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """The routed experts through kernels.ops.fused_moe ([T, D]), or None when the weights
        are not plain stacked tensors (see stacked()); the caller then uses __call__."""
        w = self.stacked()
        if w is None or w[0].dtype != x.dtype or w[0].device != x.device:
            return None
        from kernels import ops

        return ops.fused_moe(x, w[0], w[1], ids, weights)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/ids [T, K] -> [T, D]."""
        if self.bank is None:
            if self.fused is not None:
                return self.fused(x, weights, ids)
            if hasattr(self.gate_up, "routed"):  # grouped CPU kernel (weights/vnni.py)
                return self.gate_up.routed(self.down, x, weights, ids)
            return self._loop(x, weights, ids, lambda e: (self.gate_up[e], self.down[e]))
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts).tolist()
        active = [e for e, n in enumerate(counts) if n]
        got = self.bank.acquire(active, [counts[e] for e in active])
        try:
            self.bank.prefetch_next(x)  # overlaps the next layer's copies with this compute
            if self.fused_slots is not None:
                slot_ids = self.bank.fused_ids(ids, got)
                if slot_ids is not None:
                    return self.fused_slots(x, weights, slot_ids)
            return self._loop(x, weights, ids, got.weights.__getitem__)
        finally:
            self.bank.release(got)

    def _loop(self, x, weights, ids, weights_of) -> torch.Tensor:
        """Tokens sorted by expert, run per active expert as one GEMM, weighted and scattered
        back (no one-hot over all experts). ``weights_of(e)`` -> (gate_up, down) for linear()."""
        t, k = ids.shape
        flat_ids = ids.reshape(-1)  # [T*K]
        order = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert
        token_of = order // k  # [T*K] source token of each sorted assignment
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        xs = x[token_of]  # [T*K, D] gathered
        w_sorted = weights.reshape(-1)[order].unsqueeze(-1)  # [T*K, 1]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sl = slice(start, start + n)
            gate_up, down = weights_of(e)
            xe = xs[sl]
            if gate_up.device != xe.device:  # a cold expert computed where it lives (CPU)
                xe = xe.to(gate_up.device)
            gate, up = linear(xe, gate_up).chunk(2, dim=-1)  # [n, I] each
            out[sl] = linear(F.silu(gate) * up, down).to(out.device)
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

    def __call__(self, x: torch.Tensor, step=None) -> torch.Tensor:
        """x [T, D] -> [T, D]. The routed experts run through the step backend's ``experts``
        (runtime/models/steps.py); without one, through the fused kernel when kernels.backend
        picks Triton for x's device, else the per-expert loop."""
        weights, ids = self.router(x)
        if step is not None:
            y = step.experts(self.experts, x, weights, ids)
        else:
            y = self.experts.fused_kernel(x, weights, ids) if use_triton(x.device) else None
            if y is None:  # torch path (CPU default), or experts the kernel does not take
                y = self.experts(x, weights, ids)
        if self.shared is not None:
            y = y + self.shared(x)
        return y
