"""Model configuration parsed from a Hugging Face `config.json`.

Two architectures are supported:
- `glm_moe_dsa` (GLM-5/5.1): MLA + DeepSeek Sparse Attention indexer + MoE.
- `glm4_moe` (GLM-4.5/4.6/4.7): GQA with partial rotary and optional QK-norm + MoE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import ConfigError

SUPPORTED_ARCHS = ("glm_moe_dsa", "glm4_moe")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width
    num_layers: int
    num_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    # MoE
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    mlp_layer_types: tuple[str, ...]  # "dense" | "sparse" per layer
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    num_nextn_predict_layers: int = 0  # MTP layers in the checkpoint, left unloaded
    # glm4_moe (GQA)
    num_kv_heads: int = 0
    head_dim: int = 0
    use_qk_norm: bool = False
    # glm_moe_dsa (MLA + DSA)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    index_topk: int = 0
    index_head_dim: int = 0
    index_n_heads: int = 0
    indexer_types: tuple[str, ...] = ()  # "full" | "shared" per layer
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_mla(self) -> bool:
        return self.arch == "glm_moe_dsa"

    @property
    def rotary_dim(self) -> int:
        """Number of channels that receive RoPE per head."""
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def plane_widths(self) -> dict[str, tuple[int, ...]]:
        """Per-token shape of each KV plane stored in a page (see docs/architecture.md)."""
        if self.is_mla:
            return {
                "latent": (self.kv_lora_rank + self.qk_rope_head_dim,),
                "index_k": (self.index_head_dim,),
            }
        return {"k": (self.num_kv_heads, self.head_dim), "v": (self.num_kv_heads, self.head_dim)}


def _require(raw: dict, key: str, where: str):
    if key not in raw:
        raise ConfigError(
            f"{where}: missing field '{key}'; the checkpoint's config.json is incomplete"
        )
    return raw[key]


_REQUIRED = object()
MAX_SIZE = 1 << 24  # no size or count in a config.json of a model kvscope can run is larger


def _int(raw: dict, key: str, where: str, default=_REQUIRED, lo: int = 1) -> int:
    """An integer field in [lo, MAX_SIZE] (``default`` when absent or null), or ConfigError."""
    v = raw.get(key)
    if v is None:
        if default is _REQUIRED:
            _require(raw, key, where)
            raise ConfigError(f"{where}: field '{key}' is null; it must be an integer")
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{where}: field '{key}' is {json.dumps(v)[:40]}; it must be an integer")
    if not lo <= v <= MAX_SIZE:
        raise ConfigError(f"{where}: field '{key}' is {v}; it must be in [{lo}, {MAX_SIZE}]")
    return v


def _float(value, key: str, where: str) -> float:
    """A finite number, or ConfigError."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        f = float(value)
        if f == f and abs(f) != float("inf"):
            return f
    raise ConfigError(f"{where}: field '{key}' is {json.dumps(value)[:40]}; it must be a number")


def _rope_from(raw: dict, where: str) -> RopeConfig:
    params = raw.get("rope_parameters") or {}
    legacy = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ConfigError(f"{where}: 'rope_parameters' / 'rope_scaling' must be objects")
    params = dict(params)
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    merged = {**legacy, **params}
    prf = merged.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if prf is None:
        prf = 0.5 if raw.get("model_type") == "glm4_moe" else 1.0
    if not isinstance(rope_type, str) or rope_type not in ("default", "yarn"):
        raise ConfigError(f"{where}: rope_type '{rope_type}' is not supported (default, yarn)")
    return RopeConfig(
        theta=_float(theta, "rope_theta", where),
        rope_type=rope_type,
        factor=_float(merged.get("factor", 1.0), "factor", where),
        original_max_position_embeddings=merged.get("original_max_position_embeddings"),
        beta_fast=_float(merged.get("beta_fast", 32.0), "beta_fast", where),
        beta_slow=_float(merged.get("beta_slow", 1.0), "beta_slow", where),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        partial_rotary_factor=_float(prf, "partial_rotary_factor", where),
    )


def _indexer_types(raw: dict, n_layers: int, where: str) -> tuple[str, ...]:
    """Per-layer DSA indexer mode, with the same defaults transformers derives."""
    try:
        types = _indexer_types_raw(raw, n_layers, where)
        if all(t in ("full", "shared") for t in types):
            return tuple(types)
    except (KeyError, TypeError):
        pass
    raise ConfigError(
        f"{where}: 'indexer_types' / 'index_topk_pattern' is not a list of full/shared"
    )


def _indexer_types_raw(raw: dict, n_layers: int, where: str) -> list:
    types = raw.get("indexer_types")
    if types is None:
        pattern = raw.get("index_topk_pattern")
        if pattern is not None:
            types = (
                [{"F": "full", "S": "shared"}[c] for c in pattern]
                if isinstance(pattern, str)
                else list(pattern)
            )
        else:
            freq = _int(raw, "index_topk_freq", where, 1, lo=0) or 1
            offset = _int(raw, "index_skip_topk_offset", where, 2, lo=0)
            types = [
                "full" if (max(i - offset + 1, 0) % freq) == 0 else "shared"
                for i in range(n_layers)
            ]
    return list(types)


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    """Validate and normalise a HF config dict. Raises ConfigError with one clear line."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"{where}: model_type '{model_type}' is not supported; "
            f"kvscope runs {', '.join(SUPPORTED_ARCHS)}"
        )
    n_layers = _int(raw, "num_hidden_layers", where)
    first_dense = _int(
        raw, "first_k_dense_replace", where, 1 if model_type == "glm4_moe" else 3, lo=0
    )
    mlp_types = raw.get("mlp_layer_types")
    if mlp_types is not None and (
        not isinstance(mlp_types, list) or not all(t in ("dense", "sparse") for t in mlp_types)
    ):
        raise ConfigError(f"{where}: 'mlp_layer_types' must be a list of 'dense' / 'sparse'")
    if mlp_types is None:
        n_dense = min(first_dense, n_layers)
        mlp_types = ["dense"] * n_dense + ["sparse"] * (n_layers - n_dense)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_ids):
        raise ConfigError(f"{where}: 'eos_token_id' must be a token id or a list of them")
    heads = _int(raw, "num_attention_heads", where)
    hidden = _int(raw, "hidden_size", where)
    common = dict(
        arch=model_type,
        vocab_size=_int(raw, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size", where),
        num_layers=n_layers,
        num_heads=heads,
        rms_norm_eps=_float(raw.get("rms_norm_eps", 1e-5), "rms_norm_eps", where),
        max_position_embeddings=_int(raw, "max_position_embeddings", where, 4096),
        rope=_rope_from(raw, where),
        n_routed_experts=_int(
            raw, "n_routed_experts", where, _int(raw, "num_experts", where, 0, lo=0), lo=0
        ),
        num_experts_per_tok=_int(raw, "num_experts_per_tok", where, 0, lo=0),
        moe_intermediate_size=_int(raw, "moe_intermediate_size", where, 0, lo=0),
        n_shared_experts=_int(raw, "n_shared_experts", where, 0, lo=0),
        n_group=_int(raw, "n_group", where, 1),
        topk_group=_int(raw, "topk_group", where, 1),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=_float(
            raw.get("routed_scaling_factor", 1.0), "routed_scaling_factor", where
        ),
        first_k_dense_replace=first_dense,
        mlp_layer_types=tuple(mlp_types),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        eos_token_ids=eos_ids,
        bos_token_id=raw.get("bos_token_id"),
        torch_dtype=str(raw.get("dtype", raw.get("torch_dtype", "float32")) or "float32"),
        num_nextn_predict_layers=_int(
            raw,
            "num_nextn_predict_layers",
            where,
            _int(raw, "num_mtp_layers", where, 0, lo=0),
            lo=0,
        ),
        raw=raw,
    )
    if model_type == "glm4_moe":
        cfg = ModelConfig(
            **common,
            num_kv_heads=_int(raw, "num_key_value_heads", where, heads),
            head_dim=_int(raw, "head_dim", where, max(hidden // heads, 1)),
            use_qk_norm=bool(raw.get("use_qk_norm", False)),
        )
    else:
        cfg = ModelConfig(
            **common,
            q_lora_rank=_int(raw, "q_lora_rank", where),
            kv_lora_rank=_int(raw, "kv_lora_rank", where),
            qk_nope_head_dim=_int(raw, "qk_nope_head_dim", where),
            qk_rope_head_dim=_int(raw, "qk_rope_head_dim", where),
            v_head_dim=_int(raw, "v_head_dim", where),
            index_topk=_int(raw, "index_topk", where, 2048),
            index_head_dim=_int(raw, "index_head_dim", where, 128),
            index_n_heads=_int(raw, "index_n_heads", where, 32),
            indexer_types=_indexer_types(raw, n_layers, where),
        )
    _validate(cfg, where)
    return cfg


def _validate(cfg: ModelConfig, where: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if len(cfg.mlp_layer_types) != cfg.num_layers:
        raise bad("mlp_layer_types length does not match num_hidden_layers")
    if any(t == "sparse" for t in cfg.mlp_layer_types):
        if cfg.n_routed_experts <= 0 or cfg.num_experts_per_tok <= 0:
            raise bad("MoE layers need n_routed_experts > 0 and num_experts_per_tok > 0")
        if cfg.num_experts_per_tok > cfg.n_routed_experts:
            raise bad("num_experts_per_tok exceeds n_routed_experts")
        if cfg.n_routed_experts % cfg.n_group != 0:
            raise bad(
                f"n_routed_experts {cfg.n_routed_experts} not divisible by n_group {cfg.n_group}"
            )
        if cfg.topk_group > cfg.n_group:
            raise bad("topk_group exceeds n_group")
    if cfg.is_mla:
        if len(cfg.indexer_types) != cfg.num_layers:
            raise bad("indexer_types length does not match num_hidden_layers")
        if cfg.indexer_types and cfg.indexer_types[0] != "full":
            raise bad("indexer_types[0] must be 'full' (shared layers reuse an earlier selection)")
        if cfg.qk_rope_head_dim % 2 or cfg.qk_rope_head_dim > cfg.index_head_dim:
            raise bad("qk_rope_head_dim must be even and <= index_head_dim")
    else:
        if cfg.num_heads % cfg.num_kv_heads:
            raise bad("num_attention_heads must be a multiple of num_key_value_heads")
        if cfg.rotary_dim % 2:
            raise bad("head_dim * partial_rotary_factor must be even")


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; --model must name a checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(raw, where=str(path))
