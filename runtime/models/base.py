"""Shared skeleton of a causal MoE LM over paged KV: embedding, layer loop, norm, LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.kv.pool import KVPool
from runtime.models.batch import ForwardBatch
from runtime.models.layers import DenseMLP, Experts, MoE, Router, linear, rms_norm
from runtime.weights.checkpoint import Checkpoint


class WeightReader:
    """Reads tensors by HF name, checking each against the shape config.json implies."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
        self.ckpt, self.dtype, self.device = ckpt, dtype, device

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None):
        t = self.ckpt.get(name, expect_shape=shape)
        return t.to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def maybe(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None):
        return self(name, shape, dtype) if self.ckpt.has(name) else None


def load_mlp(w: WeightReader, prefix: str, d: int, i: int) -> DenseMLP:
    return DenseMLP(
        gate=w(f"{prefix}.gate_proj.weight", (i, d)),
        up=w(f"{prefix}.up_proj.weight", (i, d)),
        down=w(f"{prefix}.down_proj.weight", (d, i)),
    )


def load_moe(w: WeightReader, cfg: ModelConfig, prefix: str) -> MoE:
    d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    router = Router(
        weight=w(f"{prefix}.gate.weight", (e, d)),
        bias=w(f"{prefix}.gate.e_score_correction_bias", (e,), torch.float32),
        top_k=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob,
        scaling=cfg.routed_scaling_factor,
    )
    if w.ckpt.has(f"{prefix}.experts.gate_up_proj"):  # transformers-5 fused layout
        gate_up = w(f"{prefix}.experts.gate_up_proj", (e, 2 * i, d))
        down = w(f"{prefix}.experts.down_proj", (e, d, i))
    else:  # per-expert names, as the published checkpoints ship them
        gate_up = torch.empty((e, 2 * i, d), dtype=w.dtype, device=w.device)
        down = torch.empty((e, d, i), dtype=w.dtype, device=w.device)
        for x in range(e):
            p = f"{prefix}.experts.{x}"
            gate_up[x, :i] = w(f"{p}.gate_proj.weight", (i, d))
            gate_up[x, i:] = w(f"{p}.up_proj.weight", (i, d))
            down[x] = w(f"{p}.down_proj.weight", (d, i))
    shared = None
    if cfg.n_shared_experts > 0:
        shared = load_mlp(w, f"{prefix}.shared_experts", d, i * cfg.n_shared_experts)
    return MoE(router=router, experts=Experts(gate_up=gate_up, down=down), shared=shared)


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attn: object  # architecture-specific attention with forward(h, batch, pool, layer, state)
    mlp: DenseMLP | MoE


class CausalLM:
    """Forward over a ForwardBatch; KV planes live in a KVPool. Subclasses build `attn`."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        w = WeightReader(ckpt, dtype, self.device)
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed = w("model.embed_tokens.weight", (v, d))
        self.norm = w("model.norm.weight", (d,))
        if cfg.tie_word_embeddings and not ckpt.has("lm_head.weight"):
            self.lm_head = self.embed
        else:
            self.lm_head = w("lm_head.weight", (v, d))
        self.layers: list[DecoderLayer] = []
        for li in range(cfg.num_layers):  # MTP layers (index >= num_layers) stay unloaded
            p = f"model.layers.{li}"
            if cfg.mlp_layer_types[li] == "sparse":
                mlp = load_moe(w, cfg, f"{p}.mlp")
            else:
                mlp = load_mlp(w, f"{p}.mlp", d, cfg.intermediate_size)
            self.layers.append(
                DecoderLayer(
                    input_norm=w(f"{p}.input_layernorm.weight", (d,)),
                    post_norm=w(f"{p}.post_attention_layernorm.weight", (d,)),
                    attn=self.load_attention(w, li, f"{p}.self_attn"),
                    mlp=mlp,
                )
            )
        extra = [k for k in ckpt.keys() if k.startswith("model.layers.")]
        unknown_layer = [
            k
            for k in extra
            if int(k.split(".")[2]) >= cfg.num_layers + cfg.num_nextn_predict_layers
        ]
        if unknown_layer:
            raise CheckpointError(
                f"{ckpt.file_of(unknown_layer[0])}: tensor '{unknown_layer[0]}' belongs to a layer "
                f"beyond num_hidden_layers={cfg.num_layers}; config and weights do not match"
            )

    def load_attention(self, w: WeightReader, layer: int, prefix: str):
        raise NotImplementedError

    def new_layer_state(self, batch: ForwardBatch) -> dict:
        """Per-forward scratch shared across layers (e.g. DSA top-k of the last full layer)."""
        return {}

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool, all_logits: bool = False) -> torch.Tensor:
        """Returns logits [B, V] for each sequence's last new token ([T, V] if all_logits)."""
        cfg = self.cfg
        h = F.embedding(batch.input_ids.to(self.device), self.embed)  # [T, D]
        state = self.new_layer_state(batch)
        for li, layer in enumerate(self.layers):
            residual = h
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            h = residual + layer.attn.forward(x, batch, pool, li, state)
            residual = h
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
            h = residual + layer.mlp(x)
        if not all_logits:
            h = h[batch.last_token_index().to(self.device)]
        h = rms_norm(h, self.norm, cfg.rms_norm_eps)
        return linear(h, self.lm_head).float()
