"""Model implementations (our own; transformers is only the test oracle)."""

from __future__ import annotations

import torch

from runtime.model_config import ModelConfig
from runtime.models.base import CausalLM
from runtime.weights.checkpoint import Checkpoint


def build_model(
    cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device, plan=None, mtp=False
) -> CausalLM:
    """``plan``: a runtime.weights.placement.WeightPlan (quantization, expert offload);
    ``mtp``: load the checkpoint's MTP layer too (speculative decoding)."""
    if cfg.arch == "glm_moe_dsa":
        from runtime.models.glm_moe_dsa import GlmMoeDsaForCausalLM

        return GlmMoeDsaForCausalLM(cfg, ckpt, dtype, device, plan, mtp)
    from runtime.models.glm4_moe import Glm4MoeForCausalLM

    return Glm4MoeForCausalLM(cfg, ckpt, dtype, device, plan, mtp)
