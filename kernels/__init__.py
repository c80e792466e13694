"""kvscope's compute kernels: Triton on CUDA, plain torch on CPU.

One op per module (``kernels.<op>``), each with a private Triton ``_kernel``, a public wrapper that
checks shapes/strides/dtypes, and a ``reference_<op>`` in plain torch. ``kernels.ops`` picks one of
the two per call (see ``kernels.backend``). docs/kernels.md lists the ops and the KV layout.

This file stays light on purpose: bitsandbytes and transformers probe ``import kernels`` for an
unrelated Hugging Face package, so importing it must not pull in torch or triton, and it must not
define that package's names (``get_kernel`` ...) or a ``__version__``.

``KVSCOPE_TRITON_INTERPRET=1`` asks for the Triton kernels to run through Triton's interpreter on
CPU tensors. The interpreter has to be switched on before ``triton`` is imported, so it is done
here, as early as any of our modules can do it.
"""

import os as _os

if _os.environ.get("KVSCOPE_TRITON_INTERPRET") == "1":
    _os.environ.setdefault("TRITON_INTERPRET", "1")
