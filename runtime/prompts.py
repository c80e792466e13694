"""Turning request inputs (prompt | messages | prompt_ids) into token ids; EOS ids."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import RequestError, TokenizerError
from runtime.model_config import ModelConfig
from runtime.tokenizer import Tokenizer


def eos_ids(cfg: ModelConfig, model_dir: Path, tokenizer: Tokenizer | None) -> set[int]:
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def encode_prompt(
    cfg: ModelConfig,
    model_dir: Path,
    tokenizer: Tokenizer | None,
    prompt=None,
    messages=None,
    prompt_ids=None,
) -> list[int]:
    """Exactly one of the three inputs -> token ids. RequestError/TokenizerError on bad input."""
    if sum(x is not None for x in (prompt, messages, prompt_ids)) != 1:
        raise RequestError("give exactly one of 'prompt', 'messages' or 'prompt_ids'")
    if prompt_ids is not None:
        ok = isinstance(prompt_ids, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in prompt_ids
        )
        if not ok or not prompt_ids:
            raise RequestError("'prompt_ids' must be a non-empty list of integers")
        bad = [i for i in prompt_ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise RequestError(f"'prompt_ids' has id {bad[0]} outside the vocabulary")
        return list(prompt_ids)
    if tokenizer is None:
        raise TokenizerError(
            f"{model_dir}: no tokenizer.json, so text prompts cannot be encoded; "
            "send 'prompt_ids' instead"
        )
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise RequestError("'messages' must be a list of {role, content} objects")
        prompt = tokenizer.apply_chat_template(messages)
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise RequestError("the prompt encodes to no tokens")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:  # a tokenizer that does not belong to this model: never feed the model garbage
        raise TokenizerError(
            f"{model_dir}/tokenizer.json: token id {bad[0]} is outside the model's vocabulary "
            f"({cfg.vocab_size}, config.json); tokenizer and model do not match"
        )
    return ids
