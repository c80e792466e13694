"""Random tiny checkpoints in the published Hugging Face layout (our own writer).

`write_tiny(out_dir, arch, **overrides)` writes config.json + model.safetensors with the
per-expert tensor names GLM checkpoints use. Weights are drawn with a fixed seed and a scale
large enough that top-1 logits are not float ties.

MTP (multi-token-prediction) layers: a config with `num_nextn_predict_layers: N` (write_tiny's
`mtp=N`) also gets N "nextn" decoder layers at indices num_hidden_layers .. +N-1, in the
published layout (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, an attention block like a
main layer's with a FULL DSA indexer on glm_moe_dsa, and a sparse MoE; no `shared_head.head` /
`embed_tokens`: they are shared with the main model). They are drawn after every main tensor,
so adding them leaves the main weights of a seed unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.model_config import parse_config

BASE = {
    "glm_moe_dsa": {
        "model_type": "glm_moe_dsa",
        "architectures": ["GlmMoeDsaForCausalLM"],
        "vocab_size": 211,
        "hidden_size": 48,
        "intermediate_size": 72,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 4,
        "num_attention_heads": 3,
        "num_key_value_heads": 3,
        "q_lora_rank": 40,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 12,
        "qk_rope_head_dim": 8,
        "v_head_dim": 10,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "index_topk": 6,
        "index_head_dim": 16,
        "index_n_heads": 8,
        "indexer_types": ["full", "shared", "full", "shared"],
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "dtype": "float32",
    },
    "glm4_moe": {
        "model_type": "glm4_moe",
        "architectures": ["Glm4MoeForCausalLM"],
        "vocab_size": 203,
        "hidden_size": 40,
        "intermediate_size": 56,
        "moe_intermediate_size": 20,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "partial_rotary_factor": 0.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "first_k_dense_replace": 1,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "dtype": "float32",
    },
}


def tiny_config(arch: str, **overrides) -> dict:
    if arch not in BASE:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(BASE)}")
    raw = {**BASE[arch], **overrides}
    if arch == "glm_moe_dsa" and "indexer_types" not in overrides:
        n = raw["num_hidden_layers"]
        raw["indexer_types"] = ["full" if i % 2 == 0 else "shared" for i in range(n)]
    return raw


def tiny_tensors(
    raw: dict,
    seed: int = 0,
    scale: float = 0.15,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fan_in: bool = False,
) -> dict[str, torch.Tensor]:
    """Random weights for every tensor the published layout names, per-expert experts. Drawn on
    ``device`` (a GPU makes billions of parameters in a second; the CPU default keeps every
    existing seed's weights) and stored as ``dtype``, each tensor cast as it is drawn (peak
    memory: the checkpoint in ``dtype`` plus one fp32 tensor).

    `fan_in`: every matrix but the embedding is drawn with std 1/sqrt(in_features) instead of
    the fixed `scale`, so activations keep their size through wide layers (the benchmark presets;
    a fixed 0.15 grows them by 0.15 * sqrt(width) per matrix)."""
    cfg = parse_config(raw)
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, s=scale, fixed=False):
        if fan_in and len(shape) == 2 and not fixed:
            s = shape[1] ** -0.5
        return (torch.randn(*shape, generator=g, device=device) * s).to(dtype)

    def norm(n):
        return 1.0 + rnd(n, s=0.1)

    d, v = cfg.hidden_size, cfg.vocab_size
    t = {"model.embed_tokens.weight": rnd(v, d, s=1.0, fixed=True), "model.norm.weight": norm(d)}
    t["lm_head.weight"] = rnd(v, d, s=0.3)
    for li in range(cfg.num_layers):
        _layer(
            t,
            f"model.layers.{li}",
            cfg,
            rnd,
            norm,
            cfg.indexer_types[li] if cfg.is_mla else "",
            cfg.mlp_layer_types[li],
        )
    for li in range(cfg.num_layers, cfg.num_layers + cfg.num_nextn_predict_layers):
        p = f"model.layers.{li}"  # MTP layer (MTP_SPEC): full indexer, sparse MoE
        t[f"{p}.enorm.weight"] = norm(d)
        t[f"{p}.hnorm.weight"] = norm(d)
        t[f"{p}.eh_proj.weight"] = rnd(d, 2 * d)
        _layer(t, p, cfg, rnd, norm, "full" if cfg.is_mla else "", "sparse")
        t[f"{p}.shared_head.norm.weight"] = norm(d)
    return {k: val.contiguous() for k, val in t.items()}


def _mtp_count(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"mtp must be an integer >= 0 (MTP layers to write), got {n!r}")
    return n


def _layer(t: dict, p: str, cfg, rnd, norm, indexer: str, mlp: str) -> None:
    """One decoder layer's tensors under prefix `p`: norms, attention, MLP (drawn in this order,
    which fixes every existing seed's weights). indexer: "full" | "shared" | "" (not MLA)."""
    d = cfg.hidden_size
    t[f"{p}.input_layernorm.weight"] = norm(d)
    t[f"{p}.post_attention_layernorm.weight"] = norm(d)
    a = f"{p}.self_attn"
    if cfg.is_mla:
        h, ql, kl, r = cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        nd, vd = cfg.qk_nope_head_dim, cfg.v_head_dim
        t[f"{a}.q_a_proj.weight"] = rnd(ql, d)
        t[f"{a}.q_a_layernorm.weight"] = norm(ql)
        t[f"{a}.q_b_proj.weight"] = rnd(h * (nd + r), ql)
        t[f"{a}.kv_a_proj_with_mqa.weight"] = rnd(kl + r, d)
        t[f"{a}.kv_a_layernorm.weight"] = norm(kl)
        t[f"{a}.kv_b_proj.weight"] = rnd(h * (nd + vd), kl)
        t[f"{a}.o_proj.weight"] = rnd(d, h * vd)
        if cfg.attention_bias:
            t[f"{a}.q_a_proj.bias"] = rnd(ql)
            t[f"{a}.kv_a_proj_with_mqa.bias"] = rnd(kl + r)
            t[f"{a}.o_proj.bias"] = rnd(d)
        if indexer == "full":
            hi, di = cfg.index_n_heads, cfg.index_head_dim
            t[f"{a}.indexer.wq_b.weight"] = rnd(hi * di, ql, s=0.3)
            t[f"{a}.indexer.wk.weight"] = rnd(di, d, s=0.3)
            t[f"{a}.indexer.k_norm.weight"] = norm(di)
            t[f"{a}.indexer.k_norm.bias"] = rnd(di, s=0.1)
            t[f"{a}.indexer.weights_proj.weight"] = rnd(hi, d, s=0.3)
    else:
        h, hk, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        t[f"{a}.q_proj.weight"] = rnd(h * dh, d)
        t[f"{a}.k_proj.weight"] = rnd(hk * dh, d)
        t[f"{a}.v_proj.weight"] = rnd(hk * dh, d)
        t[f"{a}.o_proj.weight"] = rnd(d, h * dh)
        if cfg.attention_bias:
            t[f"{a}.q_proj.bias"] = rnd(h * dh)
            t[f"{a}.k_proj.bias"] = rnd(hk * dh)
            t[f"{a}.v_proj.bias"] = rnd(hk * dh)
        if cfg.use_qk_norm:
            t[f"{a}.q_norm.weight"] = norm(dh)
            t[f"{a}.k_norm.weight"] = norm(dh)
    m = f"{p}.mlp"
    if mlp == "sparse":
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        t[f"{m}.gate.weight"] = rnd(e, d, s=0.5)
        t[f"{m}.gate.e_score_correction_bias"] = rnd(e, s=0.05)
        for x in range(e):
            t[f"{m}.experts.{x}.gate_proj.weight"] = rnd(i, d)
            t[f"{m}.experts.{x}.up_proj.weight"] = rnd(i, d)
            t[f"{m}.experts.{x}.down_proj.weight"] = rnd(d, i)
        si = i * cfg.n_shared_experts
        if si:
            t[f"{m}.shared_experts.gate_proj.weight"] = rnd(si, d)
            t[f"{m}.shared_experts.up_proj.weight"] = rnd(si, d)
            t[f"{m}.shared_experts.down_proj.weight"] = rnd(d, si)
    else:
        i = cfg.intermediate_size
        t[f"{m}.gate_proj.weight"] = rnd(i, d)
        t[f"{m}.up_proj.weight"] = rnd(i, d)
        t[f"{m}.down_proj.weight"] = rnd(d, i)


def write_tiny(
    out_dir: str | Path,
    arch: str,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    mtp: int | None = None,
    **overrides,
) -> Path:
    """config.json + model.safetensors; ``device`` / ``dtype`` as in tiny_tensors (the config's
    "dtype" then names ``dtype``). ``mtp``: MTP layers to write (`num_nextn_predict_layers`;
    None keeps the config's, 0 by default)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mtp is not None:
        overrides["num_nextn_predict_layers"] = _mtp_count(mtp)
    raw = tiny_config(arch, **overrides)
    if dtype != torch.float32:
        raw["dtype"] = str(dtype).replace("torch.", "")
    tensors = tiny_tensors(raw, seed=seed, device=device, dtype=dtype)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
