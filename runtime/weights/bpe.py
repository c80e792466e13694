"""A real-size byte-level BPE tokenizer trained offline, deterministically, and cached.

Corpus: the Python standard library's own source and text files (`sys.base_prefix`/lib/pythonX.Y,
site-packages excluded), in sorted path order, capped at `max_bytes`. Training with the
`tokenizers` library is deterministic for a given corpus and vocabulary size, so the cache key is
the corpus digest + vocab size + cap + the special tokens + the tokenizers version: the same
Python install gives the same tokenizer, and a changed corpus never reuses a stale one.

Pre-tokenization is GPT-2's (ByteLevel with its regex, no prefix space), which llama.cpp knows as
the "gpt-2" pre-tokenizer: its converter is told so in app/llamacpp_convert.py.
Special tokens follow GLM's names (llama.cpp's GLM vocab code looks up [gMASK], <|user|>,
<|endoftext|> and <|observation|>), at ids 0.. in this order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
# GLM-style chat template: "[gMASK]<sop><|system|>\n...<|user|>\n...<|assistant|>\n".
CHAT_TEMPLATE = (
    "[gMASK]<sop>{%- for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the regex ByteLevel(use_regex=True) applies


def corpus_files(max_bytes: int, root: Path | None = None) -> list[Path]:
    """Sorted .py/.txt files of the standard library, summing to at most `max_bytes`."""
    if root is None:
        v = sys.version_info
        root = Path(sys.base_prefix) / "lib" / f"python{v.major}.{v.minor}"
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix in (".py", ".txt") and "site-packages" not in p.parts and p.is_file()
    )
    out, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > max_bytes:
            continue
        out.append(p)
        total += size
    if not out:
        raise FileNotFoundError(f"{root}: no .py/.txt files to train a tokenizer on")
    return out


def _read(p: Path) -> str:
    return p.read_bytes().decode("utf-8", errors="replace")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvscope" / "tokenizers"


def _key(files: list[Path], vocab_size: int, max_bytes: int) -> str:
    import tokenizers

    h = hashlib.sha256()
    h.update(json.dumps([vocab_size, max_bytes, SPECIAL_TOKENS, tokenizers.__version__]).encode())
    for p in files:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:20]


def train(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
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
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[gMASK]",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "add_bos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(out: Path, vocab_size: int, max_len: int, max_bytes: int = 16_000_000) -> int:
    """Write tokenizer.json + tokenizer_config.json into `out`; returns the vocabulary size
    actually reached (the trainer stops early on a corpus too small for `vocab_size`)."""
    from tokenizers import Tokenizer

    files = corpus_files(max_bytes)
    cached = cache_dir() / _key(files, vocab_size, max_bytes) / "tokenizer.json"
    if not cached.is_file():
        tok = train([_read(p) for p in files], vocab_size)
        for i, t in enumerate(SPECIAL_TOKENS):
            if tok.token_to_id(t) != i:
                raise RuntimeError(f"special token {t} not at id {i}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(cached)  # atomic: a concurrent maker never reads half a file
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_len), indent=2))
    return Tokenizer.from_file(str(cached)).get_vocab_size()
