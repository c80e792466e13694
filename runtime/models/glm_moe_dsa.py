"""GLM-5 (`glm_moe_dsa`): MLA attention with the DeepSeek Sparse Attention indexer, over pages.

Legend: T new tokens in the step, n new tokens of one sequence, c its context length,
H heads, Hi indexer heads, Di indexer head dim, Kl kv_lora_rank, R qk_rope_head_dim,
Nd qk_nope_head_dim, Vd v_head_dim.

KV planes per layer (see kv/pool.py): `latent` [Kl + R] = (kv_a_layernorm(c_kv), rope(k_rot))
and `index_k` [Di] (indexer key after LayerNorm and interleaved RoPE). Attention runs in the
absorbed form: queries are absorbed through kv_b's key part, scores are taken against the
latent plane, and the output leaves through kv_b's value part. Only DSA-selected positions
contribute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.model_config import ModelConfig
from runtime.models.base import CausalLM, WeightReader
from runtime.models.layers import linear
from runtime.models.rope import yarn_mscale

NORM_EPS = 1e-6  # q_a_layernorm, kv_a_layernorm and the indexer's k_norm use 1e-6 in GLM-5


@dataclass
class Indexer:
    wq_b: torch.Tensor  # [Hi*Di, q_lora]
    wk: torch.Tensor  # [Di, D]
    k_norm_w: torch.Tensor  # [Di]
    k_norm_b: torch.Tensor  # [Di]
    weights_proj: torch.Tensor  # [Hi, D] kept in fp32 as in the reference


@dataclass
class MLAAttention:
    cfg: ModelConfig
    q_a: torch.Tensor  # [q_lora, D]
    q_a_bias: torch.Tensor | None
    q_a_norm: torch.Tensor  # [q_lora]
    q_b: torch.Tensor  # [H*(Nd+R), q_lora]
    kv_a: torch.Tensor  # [Kl+R, D]
    kv_a_bias: torch.Tensor | None
    kv_a_norm: torch.Tensor  # [Kl]
    w_uk: torch.Tensor  # [H, Nd, Kl] key part of kv_b
    w_uv: torch.Tensor  # [H, Vd, Kl] value part of kv_b
    o_proj: torch.Tensor  # [D, H*Vd]
    o_bias: torch.Tensor | None
    indexer: Indexer | None  # None on "shared" layers: reuse the last full layer's selection
    scaling: float

    def project(self, x, ops):
        """Projections of T tokens through a step backend's ops (runtime/models/steps.py):
        q_resid [T, q_lora] (the indexer's input), q_nope [T, H, Nd], q_rope [T, H, R] and the
        new latent-plane rows [T, Kl + R] = (kv_a_layernorm(c_kv), rope(k_rot))."""
        cfg = self.cfg
        t = x.shape[0]
        nh, nd, r, kl = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q_resid = ops.norm(linear(x, self.q_a, self.q_a_bias), self.q_a_norm, NORM_EPS)
        q = linear(q_resid, self.q_b).view(t, nh, nd + r)
        q_nope, q_rope = q[..., :nd], ops.rope_interleaved(q[..., nd:])
        ckv = linear(x, self.kv_a, self.kv_a_bias)  # [T, Kl+R]
        latent = ops.norm(ckv[:, :kl], self.kv_a_norm, NORM_EPS)
        new_lat = torch.cat([latent, ops.rope_interleaved(ckv[:, kl:])], dim=-1)
        return q_resid, q_nope, q_rope, new_lat

    def indexer_project(self, x, q_resid, ops):
        """The DSA indexer's projections of T tokens: queries [T, Hi, Di], the new indexer-key
        rows [T, Di] (LayerNorm, interleaved RoPE on the first R channels) and the head weights
        [T, Hi] (fp32)."""
        cfg, ix = self.cfg, self.indexer
        t, hi, di, r = x.shape[0], cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        q = linear(q_resid, ix.wq_b).view(t, hi, di)
        q = torch.cat([ops.rope_interleaved(q[..., :r]), q[..., r:]], dim=-1)
        k = F.layer_norm(linear(x, ix.wk), (di,), ix.k_norm_w, ix.k_norm_b, NORM_EPS)  # [T, Di]
        k = torch.cat([ops.rope_interleaved(k[:, :r]), k[:, r:]], dim=-1)
        w = linear(x.to(ix.weights_proj.dtype), ix.weights_proj).float() * (hi**-0.5)
        return q, k, w

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o_proj of the attention output [T, H*Vd] -> [T, D]."""
        return linear(o, self.o_proj, self.o_bias)

    def forward(self, x, step, layer: int, state: dict):
        """MLA + DSA for the step's T tokens x [T, D] -> [T, D]. The new latent (and indexer-key)
        rows are stored first; a full layer's DSA selection is kept in state["sel"] for the
        shared layers after it."""
        q_resid, q_nope, q_rope, new_lat = self.project(x, step)
        step.store(layer, "latent", new_lat)
        if self.indexer is not None:
            q, k, w = self.indexer_project(x, q_resid, step)
            step.store(layer, "index_k", k)
            state["sel"] = step.dsa_topk(self, layer, q, w)
        return self.output(step.mla(self, layer, q_nope, q_rope, state.get("sel")))

    def read_planes(self, max_len: int) -> list[str]:
        """Planes a step whose contexts are at most max_len long reads (the indexer keys only
        once some context is longer than index_topk)."""
        full = self.indexer is not None and max_len > self.cfg.index_topk
        return ["index_k", "latent"] if full else ["latent"]


class GlmMoeDsaForCausalLM(CausalLM):
    def load_attention(self, w: WeightReader, layer: int, prefix: str) -> MLAAttention:
        cfg = self.cfg
        d, h = cfg.hidden_size, cfg.num_heads
        ql, kl, r = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        nd, vd = cfg.qk_nope_head_dim, cfg.v_head_dim
        kv_b = w(f"{prefix}.kv_b_proj.weight", (h * (nd + vd), kl)).view(h, nd + vd, kl)
        indexer = None
        # The MTP layer (index >= num_layers) has a full indexer of its own.
        if layer >= cfg.num_layers or cfg.indexer_types[layer] == "full":
            hi, di = cfg.index_n_heads, cfg.index_head_dim
            ip = f"{prefix}.indexer"
            indexer = Indexer(
                wq_b=w(f"{ip}.wq_b.weight", (hi * di, ql)),
                wk=w(f"{ip}.wk.weight", (di, d)),
                k_norm_w=w(f"{ip}.k_norm.weight", (di,)),
                k_norm_b=w(f"{ip}.k_norm.bias", (di,)),
                weights_proj=w(f"{ip}.weights_proj.weight", (hi, d), torch.float32),
            )
        scaling = (nd + r) ** -0.5
        if cfg.rope.rope_type != "default" and cfg.rope.mscale_all_dim:
            m = yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim)
            scaling = scaling * m * m
        bias = cfg.attention_bias
        return MLAAttention(
            cfg=cfg,
            q_a=w(f"{prefix}.q_a_proj.weight", (ql, d)),
            q_a_bias=w(f"{prefix}.q_a_proj.bias", (ql,)) if bias else None,
            q_a_norm=w(f"{prefix}.q_a_layernorm.weight", (ql,)),
            q_b=w(f"{prefix}.q_b_proj.weight", (h * (nd + r), ql)),
            kv_a=w(f"{prefix}.kv_a_proj_with_mqa.weight", (kl + r, d)),
            kv_a_bias=w(f"{prefix}.kv_a_proj_with_mqa.bias", (kl + r,)) if bias else None,
            kv_a_norm=w(f"{prefix}.kv_a_layernorm.weight", (kl,)),
            w_uk=kv_b[:, :nd, :].contiguous(),
            w_uv=kv_b[:, nd:, :].contiguous(),
            o_proj=w(f"{prefix}.o_proj.weight", (d, h * vd)),
            o_bias=w(f"{prefix}.o_proj.bias", (d,)) if bias else None,
            indexer=indexer,
            scaling=scaling,
        )
