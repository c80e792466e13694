"""GLM-4.5/4.6/4.7 (`glm4_moe`): GQA attention with partial neox RoPE and optional QK-norm.

Legend: T new tokens, n new tokens of one sequence, c its context, H query heads,
Hk KV heads, G = H / Hk, Dh head dim. KV planes per layer: `k` and `v`, each [Hk, Dh].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import ops
from runtime.kv.pool import KVPool
from runtime.model_config import ModelConfig
from runtime.models.base import CausalLM, WeightReader
from runtime.models.batch import ForwardBatch, KernelMeta
from runtime.models.glm_moe_dsa import _causal
from runtime.models.layers import linear, rms_norm
from runtime.models.rope import RotaryTables, rope_neox_partial


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

    def _project(self, x, cos, sin):
        """The torch path's q [T, H, Dh], k, v [T, Hk, Dh]: projections, QK-norm, partial RoPE."""
        cfg = self.cfg
        t, h, hk, dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = linear(x, self.wq, self.bq).view(t, h, dh)
        k = linear(x, self.wk, self.bk).view(t, hk, dh)
        v = linear(x, self.wv, self.bv).view(t, hk, dh)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm, cfg.rms_norm_eps)
        return rope_neox_partial(q, cos, sin), rope_neox_partial(k, cos, sin), v

    def forward(self, x, batch: ForwardBatch, pool: KVPool, layer: int, state: dict):
        cfg = self.cfg
        t, h, hk, dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = h // hk
        q, k, v = self._project(x, *state["cos_sin"])
        pool.store(layer, "k", batch.new_rows, k)
        pool.store(layer, "v", batch.new_rows, v)
        out = torch.empty((t, h, dh), dtype=x.dtype, device=x.device)
        scale = dh**-0.5
        for si, seq in enumerate(batch.seqs):
            for hook in batch.before_read:
                hook(layer, "k", si)
                hook(layer, "v", si)
            sl = slice(seq.offset, seq.offset + seq.n)
            keys = pool.gather(layer, "k", seq.ctx_rows)  # [c, Hk, Dh]
            vals = pool.gather(layer, "v", seq.ctx_rows)
            qs = q[sl].view(seq.n, hk, g, dh)
            scores = torch.einsum("nkgd,ckd->nkgc", qs, keys).float() * scale  # [n, Hk, G, c]
            allowed = _causal(seq.start, seq.end, x.device)[:, None, None, :]
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(x.dtype)
            out[sl] = torch.einsum("nkgc,ckd->nkgd", probs, vals).reshape(seq.n, h, dh)
        return linear(out.view(t, -1), self.wo)

    # --- decode step as one tensor function (runtime/models/decode_step.py) ---------------------

    def forward_decode(self, x, ctx_rows, planes, valid, state):
        """forward() for B single-token sequences over fixed-size gathered contexts, no host
        sync. x [B, D]; ctx_rows / valid [B, C]; state["positions"] [B]; planes: name ->
        [rows, Hk, Dh] of this layer. Returns (output [B, D], new rows {"k", "v": [B, Hk, Dh]}
        to store)."""
        from runtime.models.decode_step import gather_context

        cfg = self.cfg
        b, h, hk, dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v = self._project(x, *state["cos_sin"])
        keys = gather_context(planes["k"], ctx_rows, k, state["positions"])  # [B, C, Hk, Dh]
        vals = gather_context(planes["v"], ctx_rows, v, state["positions"])
        qs = q.view(b, hk, h // hk, dh)
        scores = torch.einsum("bkgd,bckd->bkgc", qs, keys).float() * dh**-0.5  # [B, Hk, G, C]
        probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
        out = torch.einsum("bkgc,bckd->bkgd", probs.to(x.dtype), vals).reshape(b, h * dh)
        return linear(out, self.wo), {"k": k, "v": v}

    # --- kernel path (kernels.ops; see runtime/models/kernel_path.py) ---------------------------

    def read_planes(self, max_len: int) -> list[str]:
        return ["k", "v"]

    def forward_kernels(self, x, km: KernelMeta, pool: KVPool, layer: int, state: dict, reads):
        """forward() through the kernels for all T tokens at once: QK-norm, partial neox RoPE,
        page stores of K and V, paged GQA attention over the page tables."""
        cfg = self.cfg
        t, h, hk, dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = linear(x, self.wq, self.bq).view(t, h, dh)
        k = linear(x, self.wk, self.bk).view(t, hk, dh)
        v = linear(x, self.wv, self.bv).view(t, hk, dh)
        if self.q_norm is not None:
            q, _ = ops.rmsnorm(q, self.q_norm, cfg.rms_norm_eps)
            k, _ = ops.rmsnorm(k, self.k_norm, cfg.rms_norm_eps)
        cos, sin = state["cos_sin"]  # [T, R]
        q, k = ops.rope_neox(q, cos, sin), ops.rope_neox(k, cos, sin)
        k_plane, v_plane = pool.planes["k"][layer], pool.planes["v"][layer]  # [slots, P, Hk, Dh]
        ops.page_store(k_plane, km.slot_mapping, k)
        ops.page_store(v_plane, km.slot_mapping, v)
        reads(layer, "k")
        reads(layer, "v")
        out = ops.gqa_decode(
            q,
            k_plane,
            v_plane,
            km.page_table,
            km.token_limit,
            scale=dh**-0.5,
            row_seq=km.token_seq,
        )  # [T, H, Dh]
        return linear(out.reshape(t, h * dh), self.wo)


class Glm4MoeForCausalLM(CausalLM):
    def new_layer_state(self, batch: ForwardBatch) -> dict:
        return {"cos_sin": self.rope.cos_sin(batch.positions.to(self.device), self.dtype)}

    def load_attention(self, w: WeightReader, layer: int, prefix: str) -> GQAAttention:
        cfg = self.cfg
        if not hasattr(self, "rope"):
            self.rope = RotaryTables(cfg, self.device)
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
