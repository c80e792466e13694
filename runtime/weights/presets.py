"""Benchmark checkpoints made by a command: `kvscope make-tiny --preset cpu-mini --arch A`.

A preset is a config override on top of runtime/weights/tiny.py's base config for the
architecture, written in the Hugging Face layout (config.json whose `architectures` names the
class llama.cpp's converter registers: Glm4MoeForCausalLM, GlmMoeDsaForCausalLM), bf16
safetensors with fan-in-scaled random weights, and a real-size BPE tokenizer
(runtime/weights/bpe.py). docs/performance.md describes each preset.

cpu-mini: a decode step reads hundreds of MB, far beyond any CPU cache, so CPU decode is
memory-bound as it is for real GLM models; 64 routed experts top-8 + 1 shared, first layer dense.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.weights.bpe import write_tokenizer
from runtime.weights.tiny import _mtp_count, tiny_config, tiny_tensors

_COMMON = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "n_routed_experts": 64,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "bos_token_id": 2,  # [gMASK]
    "eos_token_id": 0,  # <|endoftext|>
    "pad_token_id": 0,
    "dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, dict]] = {
    "cpu-mini": {
        "glm4_moe": {
            **_COMMON,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "max_position_embeddings": 8192,
        },
        "glm_moe_dsa": {
            **_COMMON,
            "num_key_value_heads": 16,
            "q_lora_rank": 512,
            "kv_lora_rank": 256,
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 32,
            "v_head_dim": 64,
            "index_topk": 2048,
            "index_head_dim": 64,
            "index_n_heads": 16,
            "indexer_types": ["full"] * 6,  # GLM-5: every layer scores its own keys
            "max_position_embeddings": 32768,
        },
    },
}


def preset_config(preset: str, arch: str, **overrides) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return tiny_config(arch, **{**PRESETS[preset][arch], **overrides})


def write_preset(
    out_dir: str | Path,
    preset: str,
    arch: str,
    seed: int = 0,
    corpus_bytes: int = 16_000_000,
    mtp: int = 0,
    **overrides,
) -> dict:
    """Write config.json, model.safetensors (bf16), tokenizer.json, tokenizer_config.json and
    generation_config.json. Returns the config written. `overrides` (e.g. a smaller vocab or
    width) serve the tests; the tokenizer is trained for the config's vocab_size. `mtp`: MTP
    layers to add (runtime/weights/tiny.py)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = preset_config(preset, arch, num_nextn_predict_layers=_mtp_count(mtp), **overrides)
    got = write_tokenizer(out, raw["vocab_size"], raw["max_position_embeddings"], corpus_bytes)
    if got > raw["vocab_size"]:
        raise RuntimeError(f"tokenizer has {got} tokens, more than vocab_size {raw['vocab_size']}")
    tensors = tiny_tensors(raw, seed=seed, fan_in=True, dtype=torch.bfloat16)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    gen = {"bos_token_id": raw["bos_token_id"], "eos_token_id": raw["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return raw
