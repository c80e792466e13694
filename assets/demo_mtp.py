"""The demo model's MTP ("nextn") layer: module, initialisation, evaluation and export.

Used by `build_demo.py --mtp-only`. The math is kvscope's MTP spec (vLLM's glm4_moe_mtp /
deepseek_mtp convention), at sequence position q of tokens t_0..:

    e_q = embed(t_q) (zeros at q = 0),  g_q = main post-final-norm hidden at q-1 (zeros at q = 0)
    x_q = eh_proj(cat[RMSNorm(e_q; enorm), RMSNorm(g_q; hnorm)])
    out = GlmMoeDsaDecoderLayer_N(x)   index N = num_hidden_layers: full DSA indexer, sparse MoE;
                                       causal over its own keys, RoPE position q
    logits_q = lm_head(RMSNorm(out_q; shared_head.norm))     -> predicts t_{q+1}

The embedding and the LM head are the main model's (frozen, not written again).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def _mod():
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as mod

    return mod


class MtpBlock(torch.nn.Module):
    """One MTP layer over a frozen GlmMoeDsaForCausalLM (passed to forward, not owned)."""

    def __init__(self, config, index: int = 0):
        super().__init__()
        mod = _mod()
        n = config.num_hidden_layers + index
        lcfg = copy.deepcopy(config)  # the decoder layer reads its per-layer lists at index n
        lcfg.mlp_layer_types = list(config.mlp_layer_types) + ["sparse"] * (index + 1)
        lcfg.indexer_types = list(config.indexer_types) + ["full"] * (index + 1)
        lcfg.layer_types = list(config.layer_types) + ["indexed_attention"] * (index + 1)
        d, eps = config.hidden_size, config.rms_norm_eps
        self.layer_idx = n
        self.enorm = mod.GlmMoeDsaRMSNorm(d, eps=eps)
        self.hnorm = mod.GlmMoeDsaRMSNorm(d, eps=eps)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False)
        self.layer = mod.GlmMoeDsaDecoderLayer(lcfg, n)
        self.shared_head_norm = mod.GlmMoeDsaRMSNorm(d, eps=eps)

    def inputs(self, main, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] from ids [B, T] and the main post-norm hidden states [B, T, D]."""
        e = main.model.embed_tokens(ids).detach().clone()
        e[:, 0] = 0.0
        g = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1).detach()
        return self.eh_proj(torch.cat([self.enorm(e), self.hnorm(g)], dim=-1))

    def forward(self, main, ids: torch.Tensor, hidden: torch.Tensor):
        """Returns (logits [B, T, V], out [B, T, D], x [B, T, D], position embeddings)."""
        x = self.inputs(main, ids, hidden)
        b, t = ids.shape
        pos = torch.arange(t)[None]
        pe = main.model.rotary_emb(x, position_ids=pos)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = torch.zeros(t, t, dtype=x.dtype).masked_fill(~causal, torch.finfo(x.dtype).min)
        mask = mask.expand(b, 1, t, t).contiguous()
        out, _ = self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        logits = main.lm_head(self.shared_head_norm(out))
        return logits, out, x, pe


@torch.no_grad()
def init_from_main(mtp: MtpBlock, main) -> list[str]:
    """Start the MTP decoder layer from the main model's last layer (attention, MoE, norms) and
    its indexer from the last FULL indexer layer (whose selection the last layer reuses);
    shared_head.norm from the final norm. enorm/hnorm stay 1, eh_proj stays random."""
    layers = main.model.layers
    last = layers[-1].state_dict()
    full = max(i for i, layer in enumerate(layers) if layer.self_attn.indexer is not None)
    for k, v in layers[full].self_attn.indexer.state_dict().items():
        last[f"self_attn.indexer.{k}"] = v
    mtp.layer.load_state_dict(last, strict=True)  # raises on any missing / unexpected key
    mtp.shared_head_norm.weight.copy_(main.model.norm.weight)
    return [f"model.layers.{len(layers) - 1}", f"model.layers.{full}.self_attn.indexer"]


@torch.no_grad()
def main_hidden(main, ids: torch.Tensor) -> torch.Tensor:
    """The frozen main model's post-final-norm hidden states [B, T, D] (what lm_head reads)."""
    return main.model(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def evaluate(main, mtp: MtpBlock, ids: list[int], window: int, num_windows: int, batch: int = 8):
    """Teacher-forced held-out metrics over non-overlapping windows from position 0.

    Positions q = 1 .. window-2 of each window (q = 0 has no token before it; q = window-1 has
    no t_{q+1} in the window). The MTP's prediction of t_{q+1} is argmax logits_q; the main
    model's greedy token at q+1 is argmax of its logits at q (which also predict t_{q+1})."""
    data = torch.tensor(ids[: num_windows * window]).view(num_windows, window)
    n = agree_main = agree_true = main_true = 0
    loss = 0.0
    for i in range(0, num_windows, batch):
        x = data[i : i + batch]
        hidden = main_hidden(main, x)
        main_logits = main.lm_head(hidden)
        logits, _, _, _ = mtp(main, x, hidden)
        q = slice(1, window - 1)
        target = x[:, 2:]
        draft, greedy = logits[:, q].argmax(-1), main_logits[:, q].argmax(-1)
        agree_main += (draft == greedy).sum().item()
        agree_true += (draft == target).sum().item()
        main_true += (greedy == target).sum().item()
        loss += F.cross_entropy(
            logits[:, q].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"
        ).item()
        n += target.numel()
    return {
        "positions": n,
        "top1_agree_main_greedy": agree_main / n,
        "top1_agree_true_next": agree_true / n,
        "main_top1_true_next": main_true / n,
        "loss_true_next": loss / n,
    }


def published_tensors(mtp: MtpBlock, n_experts: int, inter: int) -> dict[str, torch.Tensor]:
    """The MTP layer under `model.layers.N.` in the published GLM layout (per-expert tensors)."""
    p = f"model.layers.{mtp.layer_idx}"
    out = {
        f"{p}.enorm.weight": mtp.enorm.weight,
        f"{p}.hnorm.weight": mtp.hnorm.weight,
        f"{p}.eh_proj.weight": mtp.eh_proj.weight,
        f"{p}.shared_head.norm.weight": mtp.shared_head_norm.weight,
    }
    for k, v in mtp.layer.state_dict().items():
        if k == "mlp.experts.gate_up_proj":  # [E, 2I, D], gate rows first
            for e in range(n_experts):
                out[f"{p}.mlp.experts.{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{p}.mlp.experts.{e}.up_proj.weight"] = v[e, inter:]
        elif k == "mlp.experts.down_proj":  # [E, D, I]
            for e in range(n_experts):
                out[f"{p}.mlp.experts.{e}.down_proj.weight"] = v[e]
        else:
            out[f"{p}.{k}"] = v
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sorted(out.items())}


def load_published(mtp: MtpBlock, tensors: dict[str, torch.Tensor], n_experts: int) -> None:
    """Inverse of published_tensors (strict: every layer-N tensor is used, none is missing)."""
    p = f"model.layers.{mtp.layer_idx}."
    t = {k.removeprefix(p): v for k, v in tensors.items() if k.startswith(p)}
    with torch.no_grad():
        mtp.enorm.weight.copy_(t.pop("enorm.weight"))
        mtp.hnorm.weight.copy_(t.pop("hnorm.weight"))
        mtp.eh_proj.weight.copy_(t.pop("eh_proj.weight"))
        mtp.shared_head_norm.weight.copy_(t.pop("shared_head.norm.weight"))
    experts = [
        torch.cat(
            [t.pop(f"mlp.experts.{e}.gate_proj.weight"), t.pop(f"mlp.experts.{e}.up_proj.weight")]
        )
        for e in range(n_experts)
    ]
    t["mlp.experts.gate_up_proj"] = torch.stack(experts)
    t["mlp.experts.down_proj"] = torch.stack(
        [t.pop(f"mlp.experts.{e}.down_proj.weight") for e in range(n_experts)]
    )
    mtp.layer.load_state_dict(t, strict=True)


@torch.no_grad()
def greedy_speculation(main, mtp: MtpBlock, prompts: list[list[int]], new_tokens: int, eos) -> dict:
    """Simulated greedy speculative decoding with one drafted token per verify step.

    Each prompt is continued greedily by the main model (transformers' generate, stopping at
    `eos`); on that sequence S the draft made at position q (t_q just produced, main hidden at
    q-1) is argmax logits_q, and the verify step accepts it iff it equals S[q+1], the main
    model's greedy token. Walking the decode from the first generated token: an accepted draft
    yields 2 tokens (draft + the verify step's bonus token) and moves 2 positions on, a rejected
    one yields 1. Returns tokens per verify step (the accept length) over all prompts."""
    steps = tokens = drafts_ok = 0
    for prompt in prompts:
        x = torch.tensor([prompt])
        seq = main.generate(
            x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
        hidden = main_hidden(main, seq)
        logits, _, _, _ = mtp(main, seq, hidden)
        agree = (logits[0, :-1].argmax(-1) == seq[0, 1:]).tolist()  # agree[q]: draft at q ok
        q = len(prompt)  # t_q = the first generated token, produced by the prefill
        while q + 1 < seq.shape[1]:
            steps += 1
            if agree[q]:
                tokens, drafts_ok, q = tokens + 2, drafts_ok + 1, q + 2
            else:
                tokens, q = tokens + 1, q + 1
    return {
        "accept_length": tokens / steps,
        "draft_accept_rate": drafts_ok / steps,
        "verify_steps": steps,
        "prompts": len(prompts),
    }
