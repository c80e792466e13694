"""Tokenizer (HF `tokenizers`), chat template (jinja2) and streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.errors import TokenizerError


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: not found")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from None
        cfg_path = d / "tokenizer_config.json"
        self.config: dict = {}
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
            if not isinstance(self.config, dict):
                raise TokenizerError(f"{cfg_path}: expected a JSON object")
        template = self.config.get("chat_template")
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._template = None  # the compiled chat template, built on first use
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> str:
        """Render the checkpoint's template; `tools` (OpenAI tool specs) reach it as `tools`."""
        if not self.chat_template:
            raise TokenizerError(
                "tokenizer_config.json has no chat_template; send 'prompt' instead"
            )
        try:
            if self._template is None:  # compiled once: a server renders it per request
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                env.globals["raise_exception"] = _raise
                env.filters["tojson"] = _tojson  # HF templates pass ensure_ascii / indent
                self._template = env.from_string(self.chat_template)
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(msg: str):
    raise jinja2.TemplateError(msg)


def _token_str(tok) -> str | None:
    """A special token of tokenizer_config.json (a string or {"content": ...}); None if it is
    anything else."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


class StreamDecoder:
    """Turns a growing list of token ids into text deltas without breaking UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.tok is None:
            return ""
        full = self.tok.decode(self.ids)
        if full.endswith("\ufffd"):  # incomplete multi-byte character: wait for more
            return ""
        delta = full[len(self.text) :] if full.startswith(self.text) else full
        self.text = full
        return delta
