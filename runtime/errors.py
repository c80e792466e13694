"""User-facing errors: each carries one clear line (what, where, what to do).

The CLI prints `str(err)` on stderr and exits with `exit_code`; no traceback reaches the user.
"""

from __future__ import annotations


class KvscopeError(Exception):
    """Base class for errors caused by input or configuration, not by a bug."""

    exit_code = 2


class ConfigError(KvscopeError):
    """config.json missing, unsupported or inconsistent."""


class CheckpointError(KvscopeError):
    """safetensors missing, truncated, or a tensor contradicting config.json."""


class TokenizerError(KvscopeError):
    """Tokenizer files missing or unusable for the requested input."""


class RequestError(KvscopeError):
    """A request that cannot be served (too long, bad parameters)."""
