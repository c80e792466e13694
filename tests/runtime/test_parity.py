"""Our models vs the transformers oracle (pinned in pyproject's test extras) in float32.

For each tiny config: the reference must agree with itself (incremental greedy decode vs one
full forward), then our logits must match it within 1e-4 over the prompt and 32 decode steps,
and our engine's greedy tokens must equal the reference's.
"""

from __future__ import annotations

import pytest
import torch

from runtime.engine import Engine, EngineConfig
from runtime.kv.pool import KVPool, token_rows
from runtime.model_config import load_config
from runtime.models import build_model
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.tiny import write_tiny

transformers = pytest.importorskip("transformers")

# "base" checkpoints also carry one MTP layer: the main model must not notice it (transformers
# ignores the extra layer index, kvscope leaves it to the MTP path).
DSA_CONFIGS = {
    "base": dict(mtp=1),
    "odd-groups": dict(
        hidden_size=56,
        num_attention_heads=5,
        num_key_value_heads=5,
        n_routed_experts=12,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=2,
        num_hidden_layers=5,
        index_topk=5,
        indexer_types=["full", "full", "shared", "full", "shared"],
        qk_rope_head_dim=6,
        v_head_dim=14,
    ),
    "yarn-bias": dict(
        attention_bias=True,
        n_shared_experts=2,
        norm_topk_prob=False,
        index_topk=9,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
}
GLM4_CONFIGS = {
    "base": dict(mtp=1),
    "plain": dict(
        use_qk_norm=False,
        attention_bias=False,
        num_attention_heads=4,
        num_key_value_heads=4,
        partial_rotary_factor=1.0,
        n_group=1,
        topk_group=1,
    ),
    "odd-gqa": dict(
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=2,
        num_hidden_layers=4,
    ),
}
CASES = [("glm_moe_dsa", k, v) for k, v in DSA_CONFIGS.items()]
CASES += [("glm4_moe", k, v) for k, v in GLM4_CONFIGS.items()]
PROMPT_LEN, DECODE_STEPS, PAGE = 37, 32, 16  # prompt spans 3 pages; index_topk < prompt


def _hf(model_dir, arch):
    cls = (
        transformers.GlmMoeDsaForCausalLM
        if arch == "glm_moe_dsa"
        else transformers.Glm4MoeForCausalLM
    )
    return cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def _our_logits(model_dir, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Prefill the prompt, then decode the remaining tokens one by one: [len, V] logits."""
    cfg = load_config(model_dir)
    model = build_model(cfg, Checkpoint(model_dir), torch.float32, "cpu")
    pool = KVPool(cfg.num_layers, 16, PAGE, cfg.plane_widths(), torch.float32)
    pages = [11, 3, 7, 0, 14, 9]  # deliberately scattered page slots
    ids = torch.tensor(tokens)
    out = []
    chunks = [(0, prompt_len)] + [(p, p + 1) for p in range(prompt_len, len(tokens))]
    for start, end in chunks:
        rows = token_rows(pages, 0, end, PAGE)
        batch = ForwardBatch(
            ids[start:end],
            torch.arange(start, end),
            rows[start:end],
            [SeqChunk(start, end, 0, rows)],
        )
        out.append(model.forward(batch, pool, all_logits=True))
    return torch.cat(out)


@pytest.mark.parametrize("arch,name,overrides", CASES, ids=[f"{a}-{n}" for a, n, _ in CASES])
def test_parity_with_transformers(tmp_path, arch, name, overrides):
    model_dir = write_tiny(tmp_path, arch, seed=len(name), **overrides)
    cfg = load_config(model_dir)
    if cfg.is_mla:
        assert cfg.index_topk < PROMPT_LEN  # sparse selection is really exercised
    hf = _hf(model_dir, arch)
    prompt = torch.randint(
        2, cfg.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        gen = hf.generate(
            prompt,
            max_new_tokens=DECODE_STEPS,
            min_new_tokens=DECODE_STEPS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        full = hf(gen[:, :-1]).logits[0]  # [L-1, V] one full forward
    hf_tokens = gen[0, PROMPT_LEN:].tolist()
    # The reference agrees with itself: its incremental greedy tokens are its full-forward argmax.
    assert full[PROMPT_LEN - 1 :].argmax(-1).tolist() == hf_tokens, "reference is self-inconsistent"
    top2 = full.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "top-1 margins are float ties; pick another seed"

    ours = _our_logits(model_dir, gen[0, :-1].tolist(), PROMPT_LEN)
    err = (ours - full).abs().max().item()
    assert err < 1e-4, f"max |logit diff| {err:.2e}"

    engine = Engine(model_dir, EngineConfig(page_size=PAGE, dtype="float32", device="cpu"))
    tokens = engine.generate(prompt[0].tolist(), max_new_tokens=DECODE_STEPS, ignore_eos=True)
    assert tokens == hf_tokens
