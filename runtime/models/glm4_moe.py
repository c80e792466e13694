"""GLM-4.5/4.6/4.7 (`glm4_moe`): GQA attention with partial neox RoPE and optional QK-norm.

Legend: T new tokens, n new tokens of one sequence, c its context, H query heads,
Hk KV heads, G = H / Hk, Dh head dim. KV planes per layer: `k` and `v`, each [Hk, Dh].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.model_config import ModelConfig
from runtime.models.base import CausalLM, WeightReader
from runtime.models.layers import linear


@dataclass
class GQAAttention:
    cfg: ModelConfig
    wq: torch.Tensor  # [H*Dh, D]
    wk: torch.Tensor  # [Hk*Dh, D]
    wv: torch.Tensor  # [Hk*Dh, D]
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    wo: torch.Tensor  # [D, H*Dh]
    q_norm: torch.Tensor | None  # [Dh]
    k_norm: torch.Tensor | None

    def project(self, x, ops):
        """q [T, H, Dh], k, v [T, Hk, Dh] through a step backend's ops (runtime/models/steps.py):
        projections, QK-norm, partial neox RoPE."""
        cfg = self.cfg
        t, h, hk, dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = linear(x, self.wq, self.bq).view(t, h, dh)
        k = linear(x, self.wk, self.bk).view(t, hk, dh)
        v = linear(x, self.wv, self.bv).view(t, hk, dh)
        if self.q_norm is not None:
            q = ops.norm(q, self.q_norm, cfg.rms_norm_eps)
            k = ops.norm(k, self.k_norm, cfg.rms_norm_eps)
        return ops.rope_neox(q), ops.rope_neox(k), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [T, H*Dh] -> [T, D]."""
        return linear(o, self.wo)

    def forward(self, x, step, layer: int, state: dict):
        """GQA for the step's T tokens x [T, D] -> [T, D]; K and V rows are stored first."""
        q, k, v = self.project(x, step)
        step.store(layer, "k", k)
        step.store(layer, "v", v)
        return self.output(step.gqa(self, layer, q))

    def read_planes(self, max_len: int) -> list[str]:
        return ["k", "v"]


class Glm4MoeForCausalLM(CausalLM):
    def load_attention(self, w: WeightReader, layer: int, prefix: str) -> GQAAttention:
        cfg = self.cfg
        d, h, hk, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        b = cfg.attention_bias
        return GQAAttention(
            cfg=cfg,
            wq=w(f"{prefix}.q_proj.weight", (h * dh, d)),
            wk=w(f"{prefix}.k_proj.weight", (hk * dh, d)),
            wv=w(f"{prefix}.v_proj.weight", (hk * dh, d)),
            bq=w(f"{prefix}.q_proj.bias", (h * dh,)) if b else None,
            bk=w(f"{prefix}.k_proj.bias", (hk * dh,)) if b else None,
            bv=w(f"{prefix}.v_proj.bias", (hk * dh,)) if b else None,
            wo=w(f"{prefix}.o_proj.weight", (d, h * dh)),
            q_norm=w(f"{prefix}.q_norm.weight", (dh,)) if cfg.use_qk_norm else None,
            k_norm=w(f"{prefix}.k_norm.weight", (dh,)) if cfg.use_qk_norm else None,
        )
