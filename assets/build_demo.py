"""Build kvscope's demo model: a small GLM-5 (`glm_moe_dsa`) trained on CPython's own prose.

Reproducible and seeded. Run from the repository root:

    .venv/bin/python assets/build_demo.py --out assets/demo

Steps: (1) collect an English corpus from the installed CPython standard library (docstrings,
comments and the pydoc topic texts, all under the PSF License), split off a held-out set by
document hash; (2) train a byte-level BPE tokenizer with chat special tokens; (3) train a small
`GlmMoeDsaForCausalLM` with every architectural feature on (MLA, DSA indexer with full and shared
layers, dense first layer, grouped top-k routing over routed + shared experts); (4) write the
checkpoint in the published Hugging Face layout (per-expert tensor names), reload it with
`from_pretrained` and check it, then measure held-out loss, expert load and greedy samples and
write them to `metrics.json`. transformers is needed at build time only.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import platform
import random
import re
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

import torch
import torch.nn.functional as F

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
EOS, USER, ASSISTANT, SYSTEM = range(4)
# GLM-style chat template: "<|system|>\n...<|user|>\n...<|assistant|>\n".
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SYSTEM_PROMPT = "You are a helpful assistant that explains Python."
HELDOUT_PERCENT = 3  # documents whose sha256 % 100 < this go to the held-out split
SEPARATOR = "<|endoftext|>"
PROMPTS = [
    "The function returns",
    "This method is called when",
    "An exception is raised if",
]
CHAT_PROMPT = "What does the sort method do?"

# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "lib2to3",
    "turtledemo",
    "__pycache__",
    "ensurepip",
}
TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2026": "...",
        "\u2013": "-",
        "\u2014": "-",
        "\u00a0": " ",
    }
)
WORD = re.compile(r"""^[("'*]*[A-Za-z][A-Za-z'-]*[)"'*]*[.,;:!?]?[)"']*$""")
HEADING_CHARS = set("=-~*^#")


def clean_paragraph(text: str) -> str | None:
    """Reflow one paragraph to a single line, or None when it is code, markup or too short."""
    text = text.translate(TYPOGRAPHY)
    if ">>>" in text or "::=" in text or "Traceback" in text:
        return None
    lines = [line.strip() for line in text.strip().split("\n")]
    if len(lines) >= 2 and set(lines[-1]) <= HEADING_CHARS:
        return None
    out = re.sub(r"^(?:[*\-+]|\d+\.|\(\d+\))\s+", "", " ".join(lines))
    out = re.sub(r"\s+", " ", out).strip()
    words = out.split()
    if not out.isascii() or len(words) < 6:
        return None
    if sum(bool(WORD.match(w)) for w in words) / len(words) < 0.8:
        return None
    if not re.search(r"[.!?:)]$", out):
        return None
    return out


def paragraphs(text: str) -> list[str]:
    return [c for p in re.split(r"\n\s*\n", text.strip()) if (c := clean_paragraph(p))]


def topic_title(raw: str) -> str | None:
    lines = raw.strip().split("\n")
    if len(lines) >= 2 and lines[1].strip() and set(lines[1].strip()) <= HEADING_CHARS:
        return lines[0].strip()
    return None


def collect_corpus() -> list[dict]:
    """Documents from the running CPython: pydoc topics, then docstrings and comments per file."""
    from pydoc_data import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[dict] = []
    for key in sorted(topics.topics):
        raw = topics.topics[key]
        if paras := paragraphs(raw):
            docs.append({"kind": "topic", "name": topic_title(raw) or key, "paras": paras})
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS & set(rel.parts) or rel.name.startswith("test_"):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if (doc := ast.get_docstring(tree)) and (paras := paragraphs(doc)):
            docs.append({"kind": "module", "name": module, "paras": paras})
        stack = [(tree, module)]
        while stack:
            node, prefix = stack.pop(0)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and (paras := paragraphs(doc)):
                        kind = "class" if isinstance(child, ast.ClassDef) else "function"
                        docs.append({"kind": kind, "name": name, "paras": paras})
                    stack.append((child, name))
        # Comments: consecutive comment lines form one block (one paragraph).
        blocks, current, last_line = [], [], -2
        for tok in toks:
            if tok.type != tokenize.COMMENT:
                continue
            text = tok.string.lstrip("#").strip()
            if tok.start[0] == last_line + 1 and text:
                current.append(text)
            else:
                if current:
                    blocks.append(" ".join(current))
                current = [text] if text else []
            last_line = tok.start[0]
        if current:
            blocks.append(" ".join(current))
        if paras := [c for b in blocks if (c := clean_paragraph(b))]:
            docs.append({"kind": "comments", "name": module, "paras": paras})
    seen: set[str] = set()
    unique = []
    for doc in docs:
        doc["text"] = "\n\n".join(doc["paras"])
        if doc["text"] not in seen:
            seen.add(doc["text"])
            unique.append(doc)
    return unique


def is_heldout(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


QUESTIONS = {
    "function": ["What does {n} do?", "Explain {n}.", "What is {n} for?"],
    "class": ["What is {n}?", "Explain the {n} class.", "What is {n} used for?"],
    "module": ["What is the {n} module for?", "Tell me about the {n} module."],
    "topic": ["Tell me about {n}.", "Explain {n} in Python."],
}


def chat_examples(docs: list[dict], rng: random.Random, limit: int) -> list[str]:
    """Question/answer turns built from training documents: the answer is the first paragraph."""
    out = []
    for doc in docs:
        if doc["kind"] not in QUESTIONS:
            continue
        name = ".".join(doc["name"].split(".")[-2:]) if doc["kind"] != "module" else doc["name"]
        question = rng.choice(QUESTIONS[doc["kind"]]).format(n=name.strip("_") or name)
        prefix = f"<|system|>\n{SYSTEM_PROMPT}" if rng.random() < 0.25 else ""
        out.append(f"{prefix}<|user|>\n{question}<|assistant|>\n{doc['paras'][0]}")
    rng.shuffle(out)
    return out[:limit]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, t
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def make_config(vocab_size: int):
    from transformers import GlmMoeDsaConfig

    return GlmMoeDsaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=768,  # dense MLP of layer 0
        moe_intermediate_size=128,  # each routed expert and the shared expert
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        # MLA
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        # DSA indexer: layers 0 and 2 score keys, layers 1 and 3 reuse their top-k
        index_topk=32,
        index_n_heads=8,
        index_head_dim=32,
        indexer_types=["full", "shared", "full", "shared"],
        # MoE: dense first layer, then 8 routed experts (2 groups of 4) + 1 shared
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=EOS,
        eos_token_id=[EOS, USER],
        pad_token_id=None,
    )


def _glm5():
    from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as mod

    return mod


def dense_attention_probs(attn, h, cos_sin) -> torch.Tensor:
    """Head-averaged causal softmax of the main MLA attention over all keys: [B, S, S]."""
    b, s, _ = h.shape
    q_resid = attn.q_a_layernorm(attn.q_a_proj(h))
    q = attn.q_b_proj(q_resid).view(b, s, -1, attn.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    ckv = attn.kv_a_proj_with_mqa(h)
    kv_pass, k_rot = torch.split(ckv, [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    k_pass = attn.kv_a_layernorm(kv_pass).view(b, 1, s, attn.kv_lora_rank)
    k_rot = k_rot.view(b, 1, s, attn.qk_rope_head_dim)
    cos, sin = cos_sin
    q_rot, k_rot = _glm5().apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    key, _ = attn.expand_kv(k_pass, k_rot)
    logits = torch.cat((q_pass, q_rot), dim=-1) @ key.transpose(-1, -2) * attn.scaling
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.float().softmax(-1).mean(1)


def indexer_logprobs(attn, h, cos_sin):
    """The indexer's scores exactly as GlmMoeDsaIndexer computes them, but with grad."""
    idx = attn.indexer
    b, s, _ = h.shape
    with torch.no_grad():
        q_resid = attn.q_a_layernorm(attn.q_a_proj(h))
    q = idx.wq_b(q_resid).view(b, s, idx.n_heads, idx.head_dim)
    rope, rest = idx.qk_rope_head_dim, idx.head_dim - idx.qk_rope_head_dim
    q_rot, q_pass = torch.split(q, [rope, rest], dim=-1)
    k = idx.k_norm(idx.wk(h)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [rope, rest], dim=-1)
    cos, sin = cos_sin
    q_rot, k_rot = _glm5().apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    scores = F.relu(q.float() @ k.transpose(-1, -2).float().unsqueeze(1) * idx.softmax_scale)
    weights = idx.weights_proj(h).float() * (idx.n_heads**-0.5)
    index_scores = (weights.unsqueeze(-2) @ scores).squeeze(-2)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return index_scores.masked_fill(~causal, float("-inf")).log_softmax(-1), causal


class Instrumentation:
    """Forward hooks: router load (for bias balancing) and DSA indexer distillation inputs."""

    def __init__(self, model):
        from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa as mod

        self.mod = mod
        self.attn = [layer.self_attn for layer in model.model.layers]
        self.routers = [
            layer.mlp.gate
            for layer in model.model.layers
            if isinstance(layer.mlp, mod.GlmMoeDsaMoE)
        ]
        self.counts = [torch.zeros(r.num_experts, dtype=torch.long) for r in self.routers]
        self.router_out: list = []
        self.attn_in: dict[int, tuple] = {}
        self.capture = False
        for i, a in enumerate(self.attn):
            a.register_forward_hook(self._attn_hook(i), with_kwargs=True)
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._router_hook(i))

    def _attn_hook(self, i):
        def hook(module, args, kwargs, output):
            if self.capture:
                self.attn_in[i] = (kwargs["hidden_states"].detach(), kwargs["position_embeddings"])

        return hook

    def _router_hook(self, i):
        def hook(module, args, output):
            _, _, topk_indices = output
            n = module.num_experts
            self.counts[i] += torch.bincount(topk_indices.flatten(), minlength=n).cpu()
            if self.capture:
                self.router_out.append(output)

        return hook

    def reset_counts(self):
        for c in self.counts:
            c.zero_()

    def balance_loss(self, alpha: float) -> torch.Tensor:
        """Small batch-wise balance loss (DeepSeek-V3's complementary loss, on the whole batch)."""
        total = torch.zeros(())
        for router_logits, _, topk_indices in self.router_out:
            n = router_logits.shape[-1]
            scores = router_logits.sigmoid()
            p = (scores / scores.sum(-1, keepdim=True)).mean(0)
            f = (
                torch.bincount(topk_indices.flatten(), minlength=n).float()
                * n
                / topk_indices.numel()
            )
            total = total + (f.detach() * p).sum()
        self.router_out.clear()
        return alpha * total

    @torch.no_grad()
    def update_bias(self, rate: float):
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
        for router, c in zip(self.routers, self.counts, strict=True):
            load = c.float()
            router.e_score_correction_bias += rate * torch.sign(load.mean() - load)

    def _dense_probs(self, attn, h, cos_sin) -> torch.Tensor:
        return dense_attention_probs(attn, h, cos_sin)

    def _index_logprobs(self, attn, h, cos_sin) -> torch.Tensor:
        return indexer_logprobs(attn, h, cos_sin)

    def indexer_kl(self, rows: int) -> torch.Tensor:
        """KL(main attention || indexer) per full layer, DeepSeek-V3.2 style.

        The target is the head-averaged dense attention of the full layer and of the shared
        layers that reuse its top-k; only the indexer's own weights receive gradient. Only the
        first `rows` sequences of the batch are used, to keep the cost down.
        """
        inputs = {j: (h[:rows], (c[:rows], s[:rows])) for j, (h, (c, s)) in self.attn_in.items()}
        total = torch.zeros(())
        groups: list[list[int]] = []
        for i, a in enumerate(self.attn):
            if a.indexer is not None:
                groups.append([i])
            elif groups:
                groups[-1].append(i)
        for group in groups:
            with torch.no_grad():
                target = torch.stack(
                    [self._dense_probs(self.attn[j], *inputs[j]) for j in group]
                ).mean(0)
            logq, causal = self._index_logprobs(self.attn[group[0]], *inputs[group[0]])
            logq = logq.masked_fill(~causal, 0.0)
            kl = (torch.xlogy(target, target) - target * logq).sum(-1).mean()
            total = total + kl
        self.attn_in.clear()
        return total / max(len(groups), 1)


def set_index_topk(model, k: int):
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.index_topk = k


# --------------------------------------------------------------------------------------------
# Evaluation and export
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_loss(model, ids: list[int], window: int, num_windows: int, batch: int = 8) -> float:
    """Mean next-token cross-entropy over non-overlapping windows (window-1 targets each)."""
    data = torch.tensor(ids[: num_windows * window]).view(num_windows, window)
    total, count = 0.0, 0
    for i in range(0, num_windows, batch):
        x = data[i : i + batch]
        logits = model(input_ids=x, use_cache=False).logits.float()
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
    return total / count


def to_published_state_dict(model) -> dict[str, torch.Tensor]:
    """Unfuse transformers' packed experts into the per-expert names GLM checkpoints use."""
    out: dict[str, torch.Tensor] = {}
    inter = model.config.moe_intermediate_size
    for key, value in model.state_dict().items():
        value = value.detach().to(torch.float32).contiguous()
        if key.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, D], gate rows first
            base = key.removesuffix("gate_up_proj")
            for e in range(value.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = value[e, :inter].clone()
                out[f"{base}{e}.up_proj.weight"] = value[e, inter:].clone()
        elif key.endswith("mlp.experts.down_proj"):  # [E, D, I]
            base = key.removesuffix("down_proj")
            for e in range(value.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = value[e].clone()
        else:
            out[key] = value.clone()
    return dict(sorted(out.items()))


def export(model, tok, out: Path, max_len: int):
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors*"):
        stale.unlink()
    model.config.architectures = ["GlmMoeDsaForCausalLM"]
    model.config.dtype = torch.float32
    model.config.save_pretrained(out)
    GenerationConfig(
        bos_token_id=EOS, eos_token_id=[EOS, USER], pad_token_id=EOS, do_sample=False
    ).save_pretrained(out)
    save_file(to_published_state_dict(model), str(out / "model.safetensors"), {"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    tok.save(str(out / "tokenizer.json"))
    # The corpus is PSF-licensed CPython text: keep its license next to what was made from it.
    psf = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if psf.is_file():
        (out / "CORPUS_LICENSE.txt").write_text(psf.read_text(encoding="utf-8"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_len), indent=2))


def verify_export(model, out: Path, ids: list[int], window: int) -> dict:
    """Reload with from_pretrained: no missing/unexpected keys, same tensors, same logits."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, GlmMoeDsaForCausalLM

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names), names
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    reloaded, info = GlmMoeDsaForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    reloaded.eval()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    x = torch.tensor(ids[: 2 * window]).view(2, window)
    with torch.no_grad():
        same = torch.equal(model(input_ids=x).logits, reloaded(input_ids=x).logits)
    assert same, "logits differ after reload"
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "The value is returned.<|endoftext|>"
    assert hf_tok(text)["input_ids"][-1] == EOS
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nHi<|assistant|>\n", chat
    return {"num_tensors": len(names), "reloaded": reloaded, "tokenizer": hf_tok}


@torch.no_grad()
def samples(model, hf_tok, max_new_tokens: int) -> list[dict]:
    out = []
    prompts = [(p, p) for p in PROMPTS]
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": CHAT_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    prompts.append((chat, CHAT_PROMPT))
    for text, shown in prompts:
        ids = hf_tok(text, return_tensors="pt")["input_ids"]
        gen = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[EOS, USER]
        )
        cont = hf_tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        out.append({"prompt": shown, "chat": text != shown, "continuation": cont})
    return out


@torch.no_grad()
def expert_load(model, inst: Instrumentation, ids: list[int], window: int, n: int) -> list:
    inst.reset_counts()
    heldout_loss(model, ids, window, n)
    return [c.tolist() for c in inst.counts]


def training_batches(train_ids: list[list[int]], seq_len: int, batch_size: int, seed: int):
    """(epoch, [batch_size, seq_len] ids) forever: each epoch the documents are shuffled (seeded),
    joined with EOS after each one and cut into consecutive seq_len windows."""
    data_rng = random.Random(seed + 1)
    epoch = 0
    while True:
        order = list(range(len(train_ids)))
        data_rng.shuffle(order)
        stream: list[int] = []
        for i in order:
            stream.extend(train_ids[i])
            stream.append(EOS)
        n = len(stream) // seq_len
        seqs = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
        for i in range(0, n - batch_size + 1, batch_size):
            yield epoch, seqs[i : i + batch_size]
        epoch += 1


# --------------------------------------------------------------------------------------------
# MTP layer (--mtp-only)
# --------------------------------------------------------------------------------------------

MTP_STEPS, MTP_LR, MTP_DENSE, MTP_DISTILL = 700, 3e-3, 60, 1.0
MTP_SIM_PROMPTS, MTP_SIM_PROMPT_LEN, MTP_SIM_NEW = 16, 48, 96  # simulated greedy decoding


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def train_mtp(args) -> int:
    """Train one MTP layer on the frozen model in args.out and add it to the checkpoint.

    Same corpus, tokenizer (read from args.out) and training stream as the main build; the main
    tensors are written back bit-identical (asserted). Loss: cross-entropy of logits_q against
    t_{q+1} for q >= 1, plus the DSA indexer KL and the router balancing of the main build."""
    import transformers
    from demo_mtp import (
        MtpBlock,
        evaluate,
        greedy_speculation,
        init_from_main,
        load_published,
        main_hidden,
        published_tensors,
    )
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from transformers import GlmMoeDsaForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()
    out = args.out
    metrics = json.loads((out / "metrics.json").read_text())
    docs = collect_corpus()
    corpus_sha = hashlib.sha256("\x00".join(d["text"] for d in docs).encode()).hexdigest()
    if corpus_sha != metrics["corpus"]["sha256"]:
        sys.exit(
            f"build_demo: the corpus of this CPython (sha256 {corpus_sha[:12]}) is not the one "
            f"{out} was trained on ({metrics['corpus']['sha256'][:12]}); run with CPython "
            f"{metrics['train']['python']}"
        )
    train_docs = [d for d in docs if not is_heldout(d["text"])]
    heldout_text = SEPARATOR.join(d["text"] for d in docs if is_heldout(d["text"]))
    chats = chat_examples(train_docs, random.Random(args.seed), args.chat_examples)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train_ids = [e.ids for e in tok.encode_batch([d["text"] for d in train_docs] + chats)]
    held_ids = tok.encode(heldout_text).ids
    assert len(held_ids) == metrics["heldout_tokens"], "held-out text differs from the record"
    num_windows = len(held_ids) // args.eval_window

    ckpt = out / "model.safetensors"
    before = load_file(str(ckpt))
    main = GlmMoeDsaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    main.requires_grad_(False)
    config = main.config
    n = config.num_hidden_layers
    main_tensors = {k: v for k, v in before.items() if (_layer_of(k) or 0) < n}
    dropped = sorted(set(before) - set(main_tensors))
    log(f"main: {len(main_tensors)} tensors kept; {len(dropped)} old MTP tensors dropped")
    mtp = MtpBlock(config)
    init = init_from_main(mtp, main)  # (transformers leaves the packed experts uninitialised)
    n_params = sum(p.numel() for p in mtp.parameters())
    log(f"MTP layer {n}: {n_params / 1e6:.2f}M parameters, init from {init}")
    attn, router = mtp.layer.self_attn, mtp.layer.mlp.gate
    counts = torch.zeros(router.num_experts, dtype=torch.long)
    router_out: list = []

    def router_hook(module, inputs, output):
        counts.add_(torch.bincount(output[2].flatten(), minlength=module.num_experts))
        if mtp.training:
            router_out.append(output)

    router.register_forward_hook(router_hook)
    params = [p for p in mtp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=args.mtp_lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.mtp_warmup:
            return args.mtp_lr * (step + 1) / args.mtp_warmup
        progress = (step - args.mtp_warmup) / max(1, args.mtp_steps - args.mtp_warmup)
        return args.mtp_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    stream = training_batches(train_ids, args.seq_len, args.batch_size, args.seed)
    history: list[dict] = []
    run_ce = run_kl = 0.0
    log_every, stopped_early, step = 25, False, 0
    train_start, cpu_start = time.time(), time.process_time()
    mtp.train()
    for step in range(args.mtp_steps):
        if (time.process_time() - cpu_start) / 60 > args.mtp_max_minutes:
            stopped_early = True
            log(f"time budget reached at step {step}")
            break
        attn.indexer.index_topk = args.seq_len if step < args.mtp_dense_steps else config.index_topk
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        _, x = next(stream)
        hidden = main_hidden(main, x)
        logits, _, xin, (cos, sin) = mtp(main, x, hidden)
        flat = logits[:, 1:-1].reshape(-1, logits.shape[-1])  # q = 1 .. T-2 -> t_{q+1}
        ce = F.cross_entropy(flat, x[:, 2:].reshape(-1))
        loss = ce
        if args.mtp_distill:  # the main model's own distribution over t_{q+1} (its logits at q)
            with torch.no_grad():
                teacher = main.lm_head(hidden[:, 1:-1]).reshape(-1, flat.shape[-1])
                teacher = teacher.log_softmax(-1)
            distill = F.kl_div(
                flat.log_softmax(-1), teacher, log_target=True, reduction="batchmean"
            )
            loss = (1 - args.mtp_distill) * ce + args.mtp_distill * distill
        # DSA indexer KL (as in the main build): target = this layer's dense attention
        r = args.kl_rows
        h_in = mtp.layer.input_layernorm(xin[:r]).detach()
        with torch.no_grad():
            target = dense_attention_probs(attn, h_in, (cos[:r], sin[:r]))
        logq, causal = indexer_logprobs(attn, h_in, (cos[:r], sin[:r]))
        logq = logq.masked_fill(~causal, 0.0)
        kl = (torch.xlogy(target, target) - target * logq).sum(-1).mean()
        bal = torch.zeros(())
        for router_logits, _, topk in router_out:
            ne = router_logits.shape[-1]
            scores = router_logits.sigmoid()
            p = (scores / scores.sum(-1, keepdim=True)).mean(0)
            f = torch.bincount(topk.flatten(), minlength=ne).float() * ne / topk.numel()
            bal = bal + (f.detach() * p).sum()
        router_out.clear()
        (loss + kl + args.balance_alpha * bal).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # aux-loss-free balancing
            load = counts.float()
            router.e_score_correction_bias += args.bias_rate * torch.sign(load.mean() - load)
        counts.zero_()
        run_ce += ce.item()
        run_kl += kl.item()
        if (step + 1) % log_every == 0:
            elapsed = time.time() - train_start
            log(
                f"mtp step {step + 1}/{args.mtp_steps} ce {run_ce / log_every:.3f} "
                f"kl {run_kl / log_every:.3f} lr {lr_at(step):.2e} {elapsed:.0f}s"
            )
            history.append({"step": step + 1, "ce": run_ce / log_every, "kl": run_kl / log_every})
            run_ce = run_kl = 0.0
        if args.mtp_eval_every and (step + 1) % args.mtp_eval_every == 0:
            mtp.eval()
            topk = attn.indexer.index_topk
            attn.indexer.index_topk = config.index_topk
            m = evaluate(main, mtp, held_ids, args.eval_window, min(16, num_windows))
            attn.indexer.index_topk = topk
            mtp.train()
            counts.zero_()
            log(
                f"  eval (16 windows): agree main {m['top1_agree_main_greedy']:.4f} "
                f"true {m['top1_agree_true_next']:.4f} loss {m['loss_true_next']:.3f}"
            )
            history[-1]["eval16"] = m
    steps_done = step if stopped_early else step + 1
    train_seconds = time.time() - train_start
    train_cpu_seconds = time.process_time() - cpu_start
    attn.indexer.index_topk = config.index_topk
    mtp.eval()
    log(
        f"trained the MTP layer {steps_done} steps in {train_seconds:.0f}s "
        f"({train_cpu_seconds:.0f}s of CPU)"
    )

    # Export: the main tensors exactly as they were, plus layer n.
    new = published_tensors(mtp, config.n_routed_experts, config.moe_intermediate_size)
    save_file({**main_tensors, **new}, str(ckpt), {"format": "pt"})
    ckpt.chmod(0o644)
    raw_config = json.loads((out / "config.json").read_text())
    raw_config["num_nextn_predict_layers"] = 1
    (out / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")

    # Checks on what was written, then the metrics from the reloaded files.
    after = load_file(str(ckpt))
    assert set(after) == set(main_tensors) | set(new)
    for k, v in main_tensors.items():
        assert torch.equal(after[k], v), f"main tensor {k} changed"
    reloaded, info = GlmMoeDsaForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    reloaded.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert {_layer_of(k) for k in info["unexpected_keys"]} == {n}, info["unexpected_keys"]
    xw = torch.tensor(held_ids[: 2 * args.eval_window]).view(2, args.eval_window)
    with torch.no_grad():
        assert torch.equal(main(input_ids=xw).logits, reloaded(input_ids=xw).logits)
    mtp2 = MtpBlock(reloaded.config)
    load_published(mtp2, after, config.n_routed_experts)
    mtp2.eval()
    for k, v in mtp.state_dict().items():
        assert torch.equal(mtp2.state_dict()[k], v), k
    m = evaluate(reloaded, mtp2, held_ids, args.eval_window, num_windows)
    log(
        f"MTP held-out: agree with main greedy {m['top1_agree_main_greedy']:.4f}, with the true "
        f"next token {m['top1_agree_true_next']:.4f} (main's own top-1 "
        f"{m['main_top1_true_next']:.4f}), loss {m['loss_true_next']:.4f}"
    )
    starts = range(0, num_windows, max(1, num_windows // MTP_SIM_PROMPTS))[:MTP_SIM_PROMPTS]
    prompts = [held_ids[i * args.eval_window :][:MTP_SIM_PROMPT_LEN] for i in starts]
    sim = greedy_speculation(reloaded, mtp2, prompts, MTP_SIM_NEW, [EOS, USER])
    log(
        f"simulated greedy decoding, 1 draft token: accept length {sim['accept_length']:.3f} "
        f"({sim['verify_steps']} verify steps over {len(prompts)} prompts)"
    )
    metrics["mtp"] = {
        "layer": n,
        "accept_length_greedy_1": round(1 + m["top1_agree_main_greedy"], 4),
        "greedy_decode_sim": {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in sim.items()},
            "procedure": (
                f"first {MTP_SIM_PROMPT_LEN} tokens of {len(prompts)} evenly spaced held-out "
                f"windows as prompts, {MTP_SIM_NEW} greedy tokens each (generate, stopping at "
                "<|endoftext|>/<|user|>); a draft made at q is accepted iff it equals the "
                "generated token at q+1; accept_length = generated tokens / verify steps"
            ),
        },
        "top1_agree_main_greedy": round(m["top1_agree_main_greedy"], 6),
        "top1_agree_true_next": round(m["top1_agree_true_next"], 6),
        "main_top1_true_next": round(m["main_top1_true_next"], 6),
        "loss_true_next": round(m["loss_true_next"], 6),
        "positions": m["positions"],
        "procedure": (
            "the held-out windows of val_loss, teacher-forced: for q = 1 .. window-2 of each "
            "window the MTP's logits_q (e = embed(t_q), g = the main model's post-final-norm "
            "hidden state at q-1, zeros at q = 0) are compared with t_{q+1} and with the main "
            "model's greedy token at q+1 (argmax of its logits at q); float32, the layer's own "
            "top-k DSA selection; accept_length_greedy_1 = 1 + top1_agree_main_greedy, the "
            "tokens per verify step of greedy speculative decoding with one drafted token"
        ),
        "parameters": n_params,
        "init": init,
        "train": {
            "steps": steps_done,
            "planned_steps": args.mtp_steps,
            "stopped_early": stopped_early,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.mtp_lr,
            "warmup": args.mtp_warmup,
            "dense_steps": args.mtp_dense_steps,
            "distill": args.mtp_distill,
            "tokens_seen": steps_done * args.batch_size * args.seq_len,
            "seconds": round(train_seconds, 1),
            "cpu_seconds": round(train_cpu_seconds, 1),
            "build_seconds": round(time.time() - t0, 1),
            "threads": args.threads,
            "hardware": cpu_name(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "history": history,
        },
    }
    metrics["safetensors_bytes"] = ckpt.stat().st_size
    metrics["num_tensors"] = len(after)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"wrote {len(new)} MTP tensors; model.safetensors {ckpt.stat().st_size} bytes")
    log(f"done in {time.time() - t0:.0f}s")
    return 0


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("assets/demo"))
    p.add_argument("--heldout", type=Path, default=Path("assets/demo_heldout.txt"))
    p.add_argument("--steps", type=int, default=700, help="optimizer steps (sets the LR schedule)")
    p.add_argument("--max-minutes", type=float, default=32.0, help="stop training early past this")
    p.add_argument(
        "--stop-after",
        type=int,
        help="train only the first N steps of the --steps schedule (replays a time-budget stop)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--dense-warmup", type=int, default=120, help="steps with dense attention")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--chat-examples", type=int, default=2000)
    p.add_argument("--bias-rate", type=float, default=2e-3, help="aux-loss-free balancing rate")
    p.add_argument("--kl-rows", type=int, default=2, help="sequences used for the indexer KL")
    p.add_argument("--balance-alpha", type=float, default=1e-3)
    p.add_argument("--eval-window", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--sample-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is steadiest on a shared 2-core box")
    m = p.add_argument_group("MTP layer (--mtp-only: train one on top of the model in --out)")
    m.add_argument("--mtp-only", action="store_true", help="keep the main weights, add the MTP")
    m.add_argument("--mtp-steps", type=int, default=MTP_STEPS, help="optimizer steps")
    m.add_argument("--mtp-lr", type=float, default=MTP_LR)
    m.add_argument("--mtp-warmup", type=int, default=20)
    m.add_argument(
        "--mtp-dense-steps", type=int, default=MTP_DENSE, help="steps with dense attention"
    )
    m.add_argument(
        "--mtp-max-minutes", type=float, default=12.0, help="stop training early past this"
    )
    m.add_argument("--mtp-eval-every", type=int, default=100)
    m.add_argument(
        "--mtp-distill",
        type=float,
        default=MTP_DISTILL,
        help="weight a of KL(main || MTP) in the loss (1-a)*CE(t_{q+1}) + a*KL",
    )
    p.add_argument("--raw", type=Path, help="save the trained weights here (torch.save) ...")
    p.add_argument("--resume-raw", action="store_true", help="... or load them and skip training")
    return p.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.machine()


def log(msg: str):
    print(msg, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.mtp_only:
        return train_mtp(args)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    import transformers
    from transformers import GlmMoeDsaForCausalLM

    t0 = time.time()
    docs = collect_corpus()
    train_docs = [d for d in docs if not is_heldout(d["text"])]
    held_docs = [d for d in docs if is_heldout(d["text"])]
    heldout_text = SEPARATOR.join(d["text"] for d in held_docs)
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.write_text(heldout_text)
    corpus_sha = hashlib.sha256("\x00".join(d["text"] for d in docs).encode()).hexdigest()
    chats = chat_examples(train_docs, random.Random(args.seed), args.chat_examples)
    log(
        f"corpus: {len(docs)} docs, {sum(len(d['text']) for d in docs)} chars; "
        f"train {len(train_docs)}, held-out {len(held_docs)} ({len(heldout_text)} chars); "
        f"{len(chats)} chat examples"
    )

    tok = train_tokenizer([d["text"] for d in train_docs] + chats, args.vocab_size)
    train_ids = [e.ids for e in tok.encode_batch([d["text"] for d in train_docs] + chats)]
    held_ids = tok.encode(heldout_text).ids
    n_train_tokens = sum(len(x) + 1 for x in train_ids)
    num_windows = len(held_ids) // args.eval_window
    log(f"tokens: train {n_train_tokens}, held-out {len(held_ids)} ({num_windows} windows)")

    config = make_config(len(tok.get_vocab()))
    model = GlmMoeDsaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")
    inst = Instrumentation(model)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    log_every = 25
    history: list[dict] = []
    train_start = time.time()
    stream = training_batches(train_ids, args.seq_len, args.batch_size, args.seed)
    model.train()
    step = 0
    stopped_early = False
    run_lm = run_kl = 0.0
    for step in range(0 if args.resume_raw else args.steps):
        if args.stop_after is not None and step >= args.stop_after:
            stopped_early = True
            log(f"--stop-after reached at step {step}")
            break
        if (time.time() - train_start) / 60 > args.max_minutes:
            stopped_early = True
            log(f"time budget reached at step {step}")
            break
        set_index_topk(model, args.seq_len if step < args.dense_warmup else config.index_topk)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        epoch, x = next(stream)
        inst.capture = True
        out = model(input_ids=x, labels=x, use_cache=False)
        inst.capture = False
        kl = inst.indexer_kl(args.kl_rows)
        bal = inst.balance_loss(args.balance_alpha)
        (out.loss + kl + bal).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        inst.update_bias(args.bias_rate)
        run_lm += out.loss.item()
        run_kl += kl.item()
        if (step + 1) % log_every == 0:
            loads = torch.stack([c.float() / c.float().mean() for c in inst.counts])
            elapsed = time.time() - train_start
            tps = (step + 1) * x.numel() / elapsed
            log(
                f"step {step + 1}/{args.steps} epoch {epoch} lm {run_lm / log_every:.3f} "
                f"kl {run_kl / log_every:.3f} lr {lr_at(step):.2e} load[min {loads.min():.2f} "
                f"max {loads.max():.2f}] {elapsed:.0f}s {tps:.0f} tok/s"
            )
            history.append({"step": step + 1, "lm": run_lm / log_every, "kl": run_kl / log_every})
            run_lm = run_kl = 0.0
        inst.reset_counts()
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            val = heldout_loss(model, held_ids, args.eval_window, min(16, num_windows))
            model.train()
            log(f"  eval step {step + 1}: held-out loss (first 16 windows) {val:.3f}")
            history[-1]["val16"] = val
    steps_done = step + 1 if not stopped_early else step
    train_seconds = time.time() - train_start
    if args.resume_raw:
        raw = torch.load(args.raw)
        model.load_state_dict(raw["state_dict"])
        steps_done, train_seconds = raw["steps_done"], raw["train_seconds"]
        history, stopped_early = raw["history"], raw["stopped_early"]
    elif args.raw:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        raw = {"state_dict": state, "steps_done": steps_done, "train_seconds": train_seconds}
        torch.save({**raw, "history": history, "stopped_early": stopped_early}, args.raw)
    set_index_topk(model, config.index_topk)
    model.eval()
    log(f"trained {steps_done} steps in {train_seconds:.0f}s")

    export(model, tok, args.out, config.max_position_embeddings)
    checked = verify_export(model, args.out, held_ids, args.eval_window)
    reloaded, hf_tok = checked["reloaded"], checked["tokenizer"]
    # Metrics come from the reloaded checkpoint, exactly as a test would compute them.
    assert hf_tok(heldout_text)["input_ids"] == held_ids
    val_loss = heldout_loss(reloaded, held_ids, args.eval_window, num_windows)
    rinst = Instrumentation(reloaded)
    loads = expert_load(reloaded, rinst, held_ids, args.eval_window, num_windows)
    if not all(min(layer) > 0 for layer in loads):
        log(f"WARNING: an expert got no held-out tokens: {loads}")
    gens = samples(reloaded, hf_tok, args.sample_tokens)
    for g in gens:
        log(f"  {g['prompt']!r} -> {g['continuation']!r}")
    size = (args.out / "model.safetensors").stat().st_size
    metrics = {
        "val_loss": round(val_loss, 6),
        "ppl": round(math.exp(val_loss), 4),
        "window": args.eval_window,
        "num_windows": num_windows,
        "heldout_file": str(args.heldout),
        "heldout_tokens": len(held_ids),
        "tokens": (
            "tokenizers.Tokenizer.from_file('tokenizer.json').encode(text).ids on the whole "
            "held-out file (no special tokens added; the literal <|endoftext|> separators "
            "between documents become id 0); AutoTokenizer(text)['input_ids'] gives the same ids"
        ),
        "procedure": (
            "windows = ids[i*window:(i+1)*window] for i in range(num_windows) (non-overlapping, "
            "from the start, the trailing partial window dropped); each window is one forward "
            "from position 0 without cache in float32 with GlmMoeDsaForCausalLM.from_pretrained "
            "(default attn implementation, sdpa); val_loss = mean cross-entropy over every "
            "next-token target (window-1 per window, all windows weighted equally); "
            "ppl = exp(val_loss)"
        ),
        "dtype": "float32",
        "expert_load_heldout": {
            f"model.layers.{i + 1}.mlp": layer for i, layer in enumerate(loads)
        },
        "samples": gens,
        "train": {
            "steps": steps_done,
            "planned_steps": args.steps,
            "stopped_early": stopped_early,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "tokens_seen": steps_done * args.batch_size * args.seq_len,
            "train_tokens_per_epoch": n_train_tokens,
            "seconds": round(train_seconds, 1),
            "build_seconds": None if args.resume_raw else round(time.time() - t0, 1),
            "resumed_from_raw": args.resume_raw,
            "threads": args.threads,
            "hardware": cpu_name(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "args": {k: str(v) for k, v in vars(args).items() if k not in ("raw", "resume_raw")},
            "history": history,
        },
        "corpus": {
            "source": f"CPython {sys.version.split()[0]} standard library (PSF License)",
            "documents": len(docs),
            "chars": sum(len(d["text"]) for d in docs),
            "heldout_documents": len(held_docs),
            "sha256": corpus_sha,
            "chat_examples": len(chats),
        },
        "parameters": n_params,
        "safetensors_bytes": size,
        "num_tensors": checked["num_tensors"],
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"val_loss {val_loss:.4f} ppl {math.exp(val_loss):.2f}; model.safetensors {size} bytes")
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
