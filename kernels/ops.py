"""The ops the runtime calls: each runs the Triton kernel or its plain-torch reference.

``ops.<name>(*args, **kwargs)`` calls ``kernels.<module>.<name>`` (the Triton wrapper) or
``kernels.<module>.reference_<name>`` with the same arguments, chosen per call from the device of
the first argument (``kernels.backend.use_triton``: CUDA tensors -> Triton; CPU tensors -> the
reference, or Triton through the interpreter when ``KVSCOPE_TRITON_INTERPRET=1``). Signatures
and shapes are documented once, in the op's own module (and docs/kernels.md). Op modules are
imported on first use, so importing this stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

from kernels.backend import use_triton

# op -> the kernels module that defines it (``<op>`` and ``reference_<op>``)
_MODULE_OF = {
    "rmsnorm": "rmsnorm",
    "rope_interleave": "rope",
    "rope_neox": "rope",
    "page_store": "page_store",
    "page_gather": "page_copy",
    "page_scatter": "page_copy",
    "page_checksum": "page_checksum",
    "dsa_indexer_scores": "dsa_indexer",
    "dsa_indexer_topk": "dsa_indexer",
    "mla_sparse_attention": "mla_decode",
    "mla_decode": "mla_decode",
    "gqa_decode": "gqa_decode",
    "attn_combine": "attn_combine",
    "fused_moe": "fused_moe",
}

__all__ = sorted(_MODULE_OF)  # the ops; plus implementation()


def implementation(name: str, device) -> Callable:
    """The function ``ops.<name>`` runs for tensors on ``device`` (Triton or the reference)."""
    mod = importlib.import_module(f"kernels.{_MODULE_OF[name]}")
    return getattr(mod, name if use_triton(device) else f"reference_{name}")


@cache
def _dispatcher(name: str) -> Callable:
    module = f"kernels.{_MODULE_OF[name]}"

    def op(first, *args, **kwargs):
        return implementation(name, first.device)(first, *args, **kwargs)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"Triton or reference {name}: see {module}."
    return op


def __getattr__(name: str) -> Callable:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'kernels.ops' has no op {name!r}")
    return _dispatcher(name)
