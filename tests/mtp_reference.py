"""Plain-torch reference of the MTP (multi-token-prediction, "nextn") layer forward (test-only).

The math is /work/wt/notes/MTP_SPEC.md's (vLLM's glm4_moe_mtp / deepseek_mtp convention), built
from transformers' own classes so that it is independent of kvscope's runtime:

    e_q = embed(t_q) (zeros at q = 0),  g_q = main post-final-norm hidden at q-1 (zeros at q = 0)
    x_q = eh_proj(cat[RMSNorm(e_q; enorm), RMSNorm(g_q; hnorm)])
    out = DecoderLayer_N(x)       transformers' Glm4MoeDecoderLayer / GlmMoeDsaDecoderLayer at
                                  index N = num_hidden_layers (sparse MoE; full DSA indexer),
                                  causal over its own keys, RoPE position q
    logits_q = head(RMSNorm(out_q; shared_head.norm))       -> predicts t_{q+1}

The main model's hidden states come from transformers' `model.model(...).last_hidden_state`,
which for both architectures is AFTER the final norm (lm_head(last_hidden_state) == logits).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

_CLASSES = {
    "glm_moe_dsa": ("GlmMoeDsaForCausalLM", "modeling_glm_moe_dsa", "GlmMoeDsa"),
    "glm4_moe": ("Glm4MoeForCausalLM", "modeling_glm4_moe", "Glm4Moe"),
}


def _layer_tensors(model_dir: Path, layer: int) -> dict[str, torch.Tensor]:
    """Every tensor under `model.layers.{layer}.` (single file or index-sharded checkpoint)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    prefix = f"model.layers.{layer}."
    out = {}
    for name in files:
        with safe_open(str(model_dir / name), "pt") as f:
            for k in f.keys():
                if k.startswith(prefix):
                    out[k.removeprefix(prefix)] = f.get_tensor(k)
    return out


def _fuse_experts(t: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """Published per-expert tensors -> transformers' packed layout: gate_up_proj [E, 2I, D]
    (gate rows first), down_proj [E, D, I]."""
    out = {k: v for k, v in t.items() if ".experts." not in k}
    gate_up = [
        torch.cat([t[f"mlp.experts.{e}.gate_proj.weight"], t[f"mlp.experts.{e}.up_proj.weight"]])
        for e in range(n_experts)
    ]
    out["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
    out["mlp.experts.down_proj"] = torch.stack(
        [t[f"mlp.experts.{e}.down_proj.weight"] for e in range(n_experts)]
    )
    used = {
        f"mlp.experts.{e}.{p}_proj.weight" for e in range(n_experts) for p in ("gate", "up", "down")
    }
    leftover = {k for k in t if ".experts." in k} - used
    assert not leftover, f"unexpected expert tensors {sorted(leftover)}"
    return out


class MtpReference:
    """The main transformers model plus MTP layer `index` (0-based among the MTP layers)."""

    def __init__(self, model_dir, dtype: torch.dtype = torch.float32, index: int = 0):
        import importlib

        import transformers

        self.dir = Path(model_dir)
        raw = json.loads((self.dir / "config.json").read_text())
        arch = raw["model_type"]
        cls_name, module, prefix = _CLASSES[arch]
        self.arch = arch
        self.main = getattr(transformers, cls_name).from_pretrained(
            self.dir, dtype=dtype, attn_implementation="eager"
        )
        self.main.eval()
        cfg = self.main.config
        n_mtp = raw.get("num_nextn_predict_layers", 0)
        if index >= n_mtp:
            raise ValueError(f"{self.dir}: num_nextn_predict_layers={n_mtp}, no MTP layer {index}")
        self.layer_idx = cfg.num_hidden_layers + index
        # The decoder layer reads its per-layer settings at layer_idx: extend the lists.
        lcfg = copy.deepcopy(cfg)
        lcfg._attn_implementation = "eager"
        if arch == "glm_moe_dsa":
            lcfg.mlp_layer_types = list(cfg.mlp_layer_types) + ["sparse"] * (index + 1)
            lcfg.indexer_types = list(cfg.indexer_types) + ["full"] * (index + 1)
            lcfg.layer_types = list(cfg.layer_types) + ["indexed_attention"] * (index + 1)
        else:
            assert self.layer_idx >= cfg.first_k_dense_replace  # -> Glm4MoeMoE
        mod = importlib.import_module(f"transformers.models.{arch}.{module}")
        layer = getattr(mod, f"{prefix}DecoderLayer")(lcfg, self.layer_idx)
        norm_cls = getattr(mod, f"{prefix}RMSNorm")

        t = _layer_tensors(self.dir, self.layer_idx)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps

        def rms(name):
            n = norm_cls(d, eps=eps)
            n.weight.data.copy_(t.pop(name))
            return n.to(dtype)

        self.enorm, self.hnorm = rms("enorm.weight"), rms("hnorm.weight")
        self.head_norm = rms("shared_head.norm.weight")
        self.eh_proj = t.pop("eh_proj.weight").to(dtype)  # [D, 2D]
        head = t.pop("shared_head.head.weight", None)
        embed = t.pop("embed_tokens.weight", None)
        self.head = (self.main.lm_head.weight if head is None else head).to(dtype)  # [V, D]
        self.embed = (self.main.model.embed_tokens.weight if embed is None else embed).to(dtype)
        state = _fuse_experts(t, cfg.n_routed_experts)
        # strict: every remaining tensor of layer N is a parameter of the decoder layer, and
        # every parameter (buffers included: e_score_correction_bias) comes from the checkpoint
        layer.load_state_dict(state, strict=True)
        self.layer = layer.to(dtype).eval()
        self.dtype = dtype

    @torch.no_grad()
    def main_hidden(self, ids: list[int]) -> torch.Tensor:
        """The main model's post-final-norm hidden states [T, D] (what lm_head reads)."""
        x = torch.tensor([ids])
        return self.main.model(input_ids=x, use_cache=False).last_hidden_state[0]

    @torch.no_grad()
    def main_logits(self, ids: list[int]) -> torch.Tensor:
        return self.main(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    @torch.no_grad()
    def forward(self, ids: list[int], g: torch.Tensor | None = None):
        """Teacher-forced MTP over tokens `ids` (positions 0..T-1). `g` [T, D]: the hidden input
        per position (default: the main model's post-norm hidden at q-1, zeros at q = 0).
        Returns (logits [T, V] float32, out [T, D] = the layer output before shared_head.norm,
        the g of a chained draft step)."""
        t = len(ids)
        x_ids = torch.tensor(ids)
        e = F.embedding(x_ids, self.embed)  # [T, D]
        e[0] = 0.0  # position 0 has no token before it to pair with
        if g is None:
            h = self.main_hidden(ids)
            g = torch.cat([torch.zeros_like(h[:1]), h[:-1]])  # g_q = h_{q-1}, g_0 = 0
        x = torch.cat([self.enorm(e), self.hnorm(g.to(self.dtype))], dim=-1) @ self.eh_proj.T
        x = x[None]  # [1, T, D]
        pos = torch.arange(t)[None]
        pe = self.main.model.rotary_emb(x, position_ids=pos)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = torch.zeros(t, t, dtype=self.dtype).masked_fill(~causal, torch.finfo(self.dtype).min)
        out = self.layer(
            x, attention_mask=mask[None, None], position_ids=pos, position_embeddings=pe
        )
        out = out[0] if isinstance(out, tuple) else out  # DSA layers also return the top-k
        out = out[0]  # [T, D]
        logits = self.head_norm(out) @ self.head.T
        return logits.float(), out


@functools.lru_cache(maxsize=4)
def load_reference(model_dir: str, dtype: torch.dtype = torch.float32) -> MtpReference:
    return MtpReference(model_dir, dtype)


def mtp_logits(model_dir, ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """logits_q for q = 0..T-1 of the first MTP layer, teacher-forced on `ids`: [T, V] float32.
    Row q predicts ids[q + 1]."""
    return load_reference(str(model_dir), dtype).forward(list(ids))[0]
