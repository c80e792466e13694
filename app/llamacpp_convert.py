"""Run llama.cpp's own converter (convert_hf_to_gguf.py) on a kvscope checkpoint, unedited.

    python -m app.llamacpp_convert LLAMA_CPP_DIR MODEL_DIR --outtype bf16 --outfile F.gguf

The converter identifies a BPE tokenizer's pre-tokenization by hashing the tokens of a fixed
text and refuses hashes it does not know (`NotImplementedError: BPE pre-tokenizer was not
recognized`): our preset tokenizers (runtime/weights/bpe.py) are freshly trained, so their hash
is new. Here, in this process only, `TextModel.get_vocab_base_pre` falls back to llama.cpp's
"gpt-2" pre-tokenizer when, and only when, the checkpoint's tokenizer.json pre-tokenizes with
ByteLevel's GPT-2 regex (what llama.cpp's "gpt-2" implements); anything else still fails as the
converter would. GLM's vocabulary setup also looks up GLM's special tokens ([gMASK],
<|observation|>, ...) to write the GGUF's bos/eom metadata; a checkpoint whose tokenizer lacks
some of them (the demo's) gets <|endoftext|>'s id for those, in this process only, with a
warning (the metadata names a token; no weight or vocabulary entry changes). No file of
llama.cpp's tree is modified.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

GPT2 = "gpt-2"


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenization, if it is one we know."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return None if pre.get("add_prefix_space") else GPT2
    return None


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: python -m app.llamacpp_convert LLAMA_CPP_DIR MODEL_DIR [converter args]")
    src, model_dir = Path(argv[0]), Path(argv[1])
    script = src / "convert_hf_to_gguf.py"
    if not script.is_file():
        sys.exit(f"{script}: not found (run `make llamacpp`)")
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion import base  # llama.cpp's converter package, from its own tree

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_name(Path(self.dir_model))
            if name is None:
                raise
            base.logger.warning(f"unknown pre-tokenizer hash; its regex is llama.cpp's {name!r}")
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    _glm_specials_fallback(base)
    sys.argv = [str(script), str(model_dir), *argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


GLM_SPECIALS = ("[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>")


def _glm_specials_fallback(base) -> None:
    """Let the converter's `_set_vocab_glm` run on a tokenizer without some GLM special tokens:
    while it runs, those names resolve to <|endoftext|>'s id (see the module doc)."""
    original = getattr(base.TextModel, "_set_vocab_glm", None)
    if original is None:
        return

    def set_vocab_glm(self) -> None:
        import transformers

        real = transformers.AutoTokenizer.from_pretrained

        def from_pretrained(*args, **kw):
            tok = real(*args, **kw)
            have = tok.get_added_vocab()
            missing = [t for t in GLM_SPECIALS if t not in have]
            if missing and "<|endoftext|>" in have:
                base.logger.warning(f"tokenizer lacks {missing}: <|endoftext|>'s id stands in")
                filled = have | {t: have["<|endoftext|>"] for t in missing}
                tok.get_added_vocab = lambda: dict(filled)  # this instance only
            return tok

        transformers.AutoTokenizer.from_pretrained = from_pretrained
        try:
            original(self)
        finally:
            transformers.AutoTokenizer.from_pretrained = real

    base.TextModel._set_vocab_glm = set_vocab_glm


if __name__ == "__main__":
    main(sys.argv[1:])
