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

from kernels import ops
from runtime.kv.pool import KVPool
from runtime.model_config import ModelConfig
from runtime.models.base import CausalLM, WeightReader
from runtime.models.batch import ForwardBatch, KernelMeta
from runtime.models.layers import linear, rms_norm
from runtime.models.rope import RotaryTables, rope_interleaved, yarn_mscale

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
    rope: RotaryTables
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

    def _project(self, x, cos, sin):
        """The torch path's projections of T tokens: q_resid [T, q_lora] (the indexer's input),
        q_nope [T, H, Nd], q_rope [T, H, R] and the new latent-plane rows [T, Kl + R] =
        (kv_a_layernorm(c_kv), rope(k_rot))."""
        cfg = self.cfg
        t = x.shape[0]
        nh, nd, r, kl = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q_resid = rms_norm(linear(x, self.q_a, self.q_a_bias), self.q_a_norm, NORM_EPS)
        q = linear(q_resid, self.q_b).view(t, nh, nd + r)
        q_nope, q_rope = q[..., :nd], rope_interleaved(q[..., nd:], cos, sin)
        ckv = linear(x, self.kv_a, self.kv_a_bias)  # [T, Kl+R]
        latent = rms_norm(ckv[:, :kl], self.kv_a_norm, NORM_EPS)
        new_lat = torch.cat([latent, rope_interleaved(ckv[:, kl:], cos, sin)], dim=-1)
        return q_resid, q_nope, q_rope, new_lat

    def forward(self, x, batch: ForwardBatch, pool: KVPool, layer: int, state: dict):
        cfg = self.cfg
        t = x.shape[0]
        nh, kl = cfg.num_heads, cfg.kv_lora_rank
        cos, sin = state["cos_sin"]
        q_resid, q_nope, q_rope, new_lat = self._project(x, cos, sin)
        pool.store(layer, "latent", batch.new_rows, new_lat)

        if self.indexer is not None:
            q_idx, w_idx = self._indexer_queries(x, q_resid, batch, pool, layer, cos, sin)
        # Absorbed queries against the latent plane: q_abs [H, T, Kl+R] = (q_nope @ W_uk, q_rope)
        q_abs = torch.cat(
            [torch.bmm(q_nope.transpose(0, 1), self.w_uk), q_rope.transpose(0, 1)], dim=-1
        )
        out = torch.empty((nh, t, cfg.v_head_dim), dtype=x.dtype, device=x.device)
        for si, seq in enumerate(batch.seqs):
            for hook in batch.before_read:
                hook(layer, "latent", si)
            sl = slice(seq.offset, seq.offset + seq.n)
            if self.indexer is not None:
                sel = self._select(q_idx[sl], w_idx[sl], seq, pool, layer, batch, si)
                state["topk"][si] = sel
            else:
                sel = state["topk"][si]
            kv = pool.gather(layer, "latent", seq.ctx_rows)  # [c, Kl+R]
            scores = torch.matmul(q_abs[:, sl], kv.t()).float() * self.scaling  # [H, n, c]
            if seq.n > 1 or sel is not None:  # a lone last token sees every position
                allowed = _causal(seq.start, seq.end, x.device)  # [n, c]
                if sel is not None:
                    allowed &= torch.zeros_like(allowed).scatter_(1, sel, True)
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = scores.softmax(dim=-1).to(x.dtype)
            o_lat = torch.matmul(probs, kv[:, :kl])  # [H, n, Kl]
            out[:, sl] = torch.bmm(o_lat, self.w_uv.transpose(1, 2))  # [H, n, Vd]
        out = out.transpose(0, 1).reshape(t, nh * cfg.v_head_dim)
        return linear(out, self.o_proj, self.o_bias)

    # --- decode step as one tensor function (runtime/models/decode_step.py) ---------------------

    def forward_decode(self, x, ctx_rows, planes, valid, state):
        """forward() for B single-token sequences over fixed-size gathered contexts, no host
        sync. x [B, D]; ctx_rows / valid [B, C]; state["positions"] [B]; planes: name ->
        [rows, *tail] of this layer. Returns (output [B, D], new plane rows {name: [B, *tail]}
        to store)."""
        from runtime.models.decode_step import gather_context

        cfg = self.cfg
        b = x.shape[0]
        nh, kl = cfg.num_heads, cfg.kv_lora_rank
        q_resid, q_nope, q_rope, new_lat = self._project(x, *state["cos_sin"])
        rows = {"latent": new_lat}
        if self.indexer is not None:
            rows["index_k"], state["sel"] = self._decode_select(
                x, q_resid, ctx_rows, planes, valid, state
            )
        allowed = valid if state["sel"] is None else state["sel"]  # [B, C]
        kv = gather_context(planes["latent"], ctx_rows, new_lat, state["positions"])  # [B, C, Kl+R]
        # The contractions are written as broadcast products + sums, not einsum/bmm: compiled,
        # each fuses with its neighbours into one vectorised loop (ATen's bmm on these small,
        # strided batches cost ~100 us each at B = 8).
        q_lat = (q_nope[..., None] * self.w_uk[None]).sum(2)  # [B, H, Kl]
        q_abs = torch.cat([q_lat, q_rope], dim=-1)  # [B, H, Kl+R]
        scores = (q_abs[:, :, None, :] * kv[:, None]).sum(-1).float() * self.scaling  # [B, H, C]
        scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(x.dtype)
        o_lat = (probs[..., None] * kv[:, None, :, :kl]).sum(2)  # [B, H, Kl]
        out = (o_lat[:, :, None, :] * self.w_uv[None]).sum(-1)  # [B, H, Vd]
        return linear(out.reshape(b, nh * cfg.v_head_dim), self.o_proj, self.o_bias), rows

    def _decode_select(self, x, q_resid, ctx_rows, planes, valid, state):
        """The new indexer-key rows [B, Di] and the DSA selection mask [B, C] (top-k of the
        index scores among causal positions; every causal position while the context fits in
        index_topk, as _select's None)."""
        from runtime.models.decode_step import gather_context

        cfg = self.cfg
        q, k, w = self._indexer_project(x, q_resid, *state["cos_sin"])  # [B, Hi, Di], [B, Di]
        keys = gather_context(
            planes["index_k"], ctx_rows, k, state["positions"]
        ).float()  # [B, C, Di]
        scale = cfg.index_head_dim**-0.5
        scores = F.relu((q.float()[:, :, None, :] * keys[:, None]).sum(-1) * scale)  # [B, Hi, C]
        index_scores = (w[..., None] * scores).sum(1).masked_fill(~valid, float("-inf"))
        top = index_scores.topk(min(cfg.index_topk, valid.shape[1]), dim=-1).indices
        sel = torch.zeros_like(valid).scatter(1, top, True) & valid
        fits = (state["positions"] < cfg.index_topk)[:, None]  # context <= index_topk
        return k, torch.where(fits, valid, sel)

    # --- kernel path (kernels.ops; see runtime/models/kernel_path.py) ---------------------------

    def read_planes(self, max_len: int) -> list[str]:
        """Planes forward_kernels reads for a step whose contexts are at most max_len long."""
        full = self.indexer is not None and max_len > self.cfg.index_topk
        return ["index_k", "latent"] if full else ["latent"]

    def forward_kernels(self, x, km: KernelMeta, pool: KVPool, layer: int, state: dict, reads):
        """forward() through the kernels for all T tokens at once: RoPE, page stores of the new
        latent / indexer-key rows, DSA top-k, absorbed sparse MLA over the page tables."""
        cfg = self.cfg
        t = x.shape[0]
        nh, nd, kl = cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
        cos, sin = state["cos_sin"]  # [T, R]
        q_resid, _ = ops.rmsnorm(linear(x, self.q_a, self.q_a_bias), self.q_a_norm, NORM_EPS)
        q = linear(q_resid, self.q_b).view(t, nh, -1)  # [T, H, Nd + R]
        q_rope = ops.rope_interleave(q[..., nd:], cos, sin)  # [T, H, R]
        ckv = linear(x, self.kv_a, self.kv_a_bias)  # [T, Kl + R]
        latent, _ = ops.rmsnorm(ckv[:, :kl], self.kv_a_norm, NORM_EPS)
        plane = pool.planes["latent"][layer]  # [slots, P, Kl + R]
        ops.page_store(plane, km.slot_mapping, latent)
        ops.page_store(plane, km.slot_mapping, ops.rope_interleave(ckv[:, kl:], cos, sin), kl)
        if self.indexer is not None:
            state["topk"] = self._select_kernels(x, q_resid, km, pool, layer, state, reads)
        sel = state["topk"]
        if sel is None:  # every causal position (row_limit cuts each row)
            sel = state.get("all_pos")
            if sel is None:
                sel = state["all_pos"] = torch.arange(
                    km.max_len, dtype=torch.int32, device=x.device
                ).expand(t, km.max_len)
        reads(layer, "latent")
        out = ops.mla_decode(
            q[..., :nd],
            q_rope,
            plane,
            km.page_table,
            sel,
            self.w_uk,
            self.w_uv,
            scale=self.scaling,
            row_seq=km.token_seq,
            row_limit=km.token_limit,
        )  # [T, H, Vd]
        return linear(out.reshape(t, nh * cfg.v_head_dim), self.o_proj, self.o_bias)

    def _select_kernels(self, x, q_resid, km: KernelMeta, pool, layer, state, reads):
        """Stores the indexer keys; DSA top-k int32 [T, min(index_topk, max_len)] (-1 = unused),
        or None when every context fits in index_topk (the selection is the causal set)."""
        cfg, ix = self.cfg, self.indexer
        t, hi, di, r = x.shape[0], cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        cos, sin = state["cos_sin"]
        k = F.layer_norm(linear(x, ix.wk), (di,), ix.k_norm_w, ix.k_norm_b, NORM_EPS)  # [T, Di]
        k = torch.cat([ops.rope_interleave(k[:, :r], cos, sin), k[:, r:]], dim=-1)
        k_plane = pool.planes["index_k"][layer]  # [slots, P, Di]
        ops.page_store(k_plane, km.slot_mapping, k)
        if km.max_len <= cfg.index_topk:
            return None
        q = linear(q_resid, ix.wq_b).view(t, hi, di)
        q = torch.cat([ops.rope_interleave(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        w = linear(x.to(ix.weights_proj.dtype), ix.weights_proj).float() * (hi**-0.5)
        reads(layer, "index_k")
        return ops.dsa_indexer_topk(
            q,
            w.contiguous(),
            k_plane,
            km.page_table,
            km.token_seq,
            km.token_limit,
            scale=di**-0.5,
            topk=cfg.index_topk,
            max_len=km.max_len,
        )

    def _indexer_project(self, x, q_resid, cos, sin):
        """The torch path's indexer projections of T tokens: queries [T, Hi, Di], the new
        indexer-key rows [T, Di] (LayerNorm, interleaved RoPE on the first R channels) and the
        head weights [T, Hi] (fp32)."""
        cfg, ix = self.cfg, self.indexer
        t, hi, di, r = x.shape[0], cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        q = linear(q_resid, ix.wq_b).view(t, hi, di)
        q = torch.cat([rope_interleaved(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = F.layer_norm(linear(x, ix.wk), (di,), ix.k_norm_w, ix.k_norm_b, NORM_EPS)  # [T, Di]
        k = torch.cat([rope_interleaved(k[:, :r], cos, sin), k[:, r:]], dim=-1)
        w = linear(x.to(ix.weights_proj.dtype), ix.weights_proj).float() * (hi**-0.5)
        return q, k, w

    def _indexer_queries(self, x, q_resid, batch, pool, layer, cos, sin):
        """Indexer queries [T, Hi, Di], head weights [T, Hi] (fp32); stores the key plane."""
        q, k, w = self._indexer_project(x, q_resid, cos, sin)
        pool.store(layer, "index_k", batch.new_rows, k)
        return q, w

    def _select(self, q_idx, w_idx, seq, pool, layer, batch, si):
        """DSA top-k positions [n, k] for one sequence, or None when every causal position
        fits in index_topk (the selection is then the full causal set)."""
        if seq.end <= self.cfg.index_topk:
            return None
        for hook in batch.before_read:
            hook(layer, "index_k", si)
        keys = pool.gather(layer, "index_k", seq.ctx_rows).float()  # [c, Di]
        scale = self.cfg.index_head_dim**-0.5
        scores = F.relu(torch.einsum("nhd,cd->nhc", q_idx.float(), keys) * scale)  # [n, Hi, c]
        index_scores = torch.einsum("nh,nhc->nc", w_idx, scores)  # [n, c]
        causal = _causal(seq.start, seq.end, q_idx.device)
        index_scores = index_scores.masked_fill(~causal, float("-inf"))
        return index_scores.topk(self.cfg.index_topk, dim=-1).indices  # [n, k]


def _causal(start: int, end: int, device) -> torch.Tensor:
    """[n, c] bool: new token at position start+i may attend to positions <= start+i."""
    q_pos = torch.arange(start, end, device=device)[:, None]
    return torch.arange(end, device=device)[None, :] <= q_pos


class GlmMoeDsaForCausalLM(CausalLM):
    def new_layer_state(self, batch: ForwardBatch) -> dict:
        cos_sin = self.rope.cos_sin(batch.positions.to(self.device), self.dtype)
        return {"cos_sin": cos_sin, "topk": [None] * len(batch.seqs)}

    def load_attention(self, w: WeightReader, layer: int, prefix: str) -> MLAAttention:
        cfg = self.cfg
        if not hasattr(self, "rope"):
            self.rope = RotaryTables(cfg, self.device)
        d, h = cfg.hidden_size, cfg.num_heads
        ql, kl, r = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        nd, vd = cfg.qk_nope_head_dim, cfg.v_head_dim
        kv_b = w(f"{prefix}.kv_b_proj.weight", (h * (nd + vd), kl)).view(h, nd + vd, kl)
        indexer = None
        if cfg.indexer_types[layer] == "full":
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
            rope=self.rope,
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
