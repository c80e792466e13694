"""GLM's multi-token-prediction (MTP) layer: the speculative draft (runtime/speculative.py).

Checkpoint layout (GLM-4.5+ and GLM-5, as DeepSeek-V3): decoder layer index N =
num_hidden_layers with ``enorm``, ``hnorm``, ``eh_proj`` [D, 2D], a full attention + MoE block
(its own KV planes, stored at pool layer N in the same pages as the main layers) and
``shared_head.norm``; the embedding and LM head are the main model's unless the layer ships its
own ``embed_tokens`` / ``shared_head.head``.

At sequence position q (vLLM's convention):

    e_q = embed(t_q), zero at q = 0;  g_q = the main model's final-norm hidden at q - 1 (zero at
    q = 0), or while drafting a chain, the MTP's own previous output
    x_q = eh_proj([enorm(e_q), hnorm(g_q)]);  out_q = DecoderLayer(x_q) (attention over the MTP
    layer's rows 0..q, RoPE at q);  logits_q = head(shared_head.norm(out_q)) -> t_{q+1}

So MTP row q depends on t_0..t_q only (a prefix of the page chain, like every other KV row):
prefix-cached pages carry valid MTP rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.models.layers import linear


@dataclass
class MtpLayer:
    layer: int  # its index in the checkpoint and in the KV pool (num_hidden_layers)
    enorm: torch.Tensor  # [D]
    hnorm: torch.Tensor  # [D]
    eh_proj: torch.Tensor  # [D, 2D]
    shared_norm: torch.Tensor  # [D]
    head: torch.Tensor | object  # [V, D] (or a quantized linear), the main LM head by default
    embed: torch.Tensor  # [V, D], the main embedding by default
    block: object  # DecoderLayer (runtime/models/base.py)


def load_mtp_layer(model, w, ckpt, index: int) -> MtpLayer:
    from runtime.models.base import DecoderLayer, load_mlp, load_moe

    cfg = model.cfg
    d, v, p = cfg.hidden_size, cfg.vocab_size, f"model.layers.{index}"
    if cfg.n_routed_experts > 0:
        mlp = load_moe(w, cfg, f"{p}.mlp")
    else:
        mlp = load_mlp(w, f"{p}.mlp", d, cfg.intermediate_size)
    block = DecoderLayer(
        input_norm=w(f"{p}.input_layernorm.weight", (d,)),
        post_norm=w(f"{p}.post_attention_layernorm.weight", (d,)),
        attn=model.load_attention(w, index, f"{p}.self_attn"),
        mlp=mlp,
    )
    head, embed = model.lm_head, model.embed
    if ckpt.has(f"{p}.shared_head.head.weight"):
        head = w(f"{p}.shared_head.head.weight", (v, d))
    if ckpt.has(f"{p}.embed_tokens.weight"):
        embed = w.tensor(f"{p}.embed_tokens.weight", (v, d))
    return MtpLayer(
        layer=index,
        enorm=w(f"{p}.enorm.weight", (d,)),
        hnorm=w(f"{p}.hnorm.weight", (d,)),
        eh_proj=w(f"{p}.eh_proj.weight", (d, 2 * d)),
        shared_norm=w(f"{p}.shared_head.norm.weight", (d,)),
        head=head,
        embed=embed,
        block=block,
    )


def mtp_forward(model, mtp: MtpLayer, input_ids, prev_hidden, step):
    """input_ids [T] (t_q), prev_hidden [T, D] (g_q) at the step's positions q -> (fp32
    logits [R, V] of the rows ``step.last_rows`` keeps, out [T, D] every row's output, the
    next chain step's g). The layer's new KV rows are stored at the step's rows first."""
    eps = model.cfg.rms_norm_eps
    e = F.embedding(input_ids, mtp.embed)  # [T, D]
    first = (step.positions == 0).unsqueeze(-1)
    e = e.masked_fill(first, 0)  # position 0 has no previous token's state: zero, as vLLM
    g = prev_hidden.to(e.dtype).masked_fill(first, 0)
    x = linear(
        torch.cat([step.norm(e, mtp.enorm, eps), step.norm(g, mtp.hnorm, eps)], -1), mtp.eh_proj
    )
    h, residual = model.run_layers(x, step, [mtp.block], mtp.layer)
    out = residual + h
    logits = linear(step.norm(step.last_rows(out), mtp.shared_norm, eps), mtp.head)
    return logits.float(), out
