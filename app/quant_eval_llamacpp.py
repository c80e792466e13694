"""llama.cpp beside kvscope in `kvscope quant-eval --peers llamacpp`: the same held-out token
windows, llama.cpp's Q8_0 / Q4_0 GGUFs against its own F32 GGUF (KL, top-1), as kvscope's int8 /
int4 are compared with kvscope's fp32; and llama.cpp's F32 against kvscope's fp32 (a check that
both run the same model). Logits come from kvscope-logits (tools/llamacpp/logits.cpp, built by
`make llamacpp`), teacher-forced over each window in one prefill.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from app.bench_llamacpp import QUANT_TYPES, ensure_gguf, locate
from runtime.errors import KvscopeError

LOGITS_TOOL = "kvscope-logits"


def window_logits(tool: str, gguf: Path, ids: list[int], threads: int = 1) -> torch.Tensor:
    """llama.cpp's logits [n, V] (fp32) after each token of `ids`."""
    with tempfile.TemporaryDirectory(prefix="kvscope-logits-") as tmp:
        out = Path(tmp) / "logits.f32"
        cmd = [tool, str(gguf), str(threads), str(out), ",".join(map(str, ids))]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
            raise KvscopeError(f"{LOGITS_TOOL} failed on {gguf.name}: {tail[0]}")
        n, vocab = map(int, res.stdout.split()[:2])
        data = np.fromfile(out, dtype="<f4")
    if n != len(ids) or data.size != n * vocab:
        raise KvscopeError(f"{LOGITS_TOOL}: {data.size} values for {len(ids)} x {vocab} logits")
    return torch.from_numpy(data.reshape(n, vocab).copy())


def llamacpp_quality(model_dir, chunks, methods, kvscope_ref, compare, log=print) -> dict:
    """{"f32_vs_kvscope_fp32": {...}, "q8_0": {...}, ...}: each llama.cpp type at the bits of
    a kvscope method in `methods` against llama.cpp's F32, and llama.cpp's F32 against
    `kvscope_ref` (kvscope's fp32 logits of the same windows, concatenated)."""
    lc = locate()
    tool = lc.tool(LOGITS_TOOL)
    if not Path(tool).is_file():
        raise KvscopeError(f"{LOGITS_TOOL} not built in {lc.bin}: run `make llamacpp`")
    model = Path(model_dir)
    vocab = kvscope_ref.shape[-1]

    def logits(gtype: str) -> torch.Tensor:
        gguf = ensure_gguf(lc, model, gtype, log)
        # llama.cpp may pad the vocabulary (GGUF rows past the model's): compare the model's
        return torch.cat([window_logits(tool, gguf, c)[:, :vocab] for c in chunks])

    ref = logits("f32")
    tokens = sum(len(c) for c in chunks)
    out = {"f32_vs_kvscope_fp32": {**compare(kvscope_ref, ref), "tokens": tokens}}
    for m in methods:
        if m in QUANT_TYPES:  # kvscope --quant -> the llama.cpp type at the same bits
            out[QUANT_TYPES[m]] = {**compare(ref, logits(QUANT_TYPES[m])), "tokens": tokens}
    return out
