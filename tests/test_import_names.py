"""Our top-level `kernels` package shares its import name with an optional Hugging Face package
that bitsandbytes and transformers probe for. Both must still import and work beside ours."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import kernels, torch
assert kernels.__file__.startswith(ROOT), kernels.__file__  # ours, not HF's
import bitsandbytes as bnb
lin = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
lin.load_state_dict({"weight": torch.randn(32, 64)})
lin = lin.to("cpu")
y = lin(torch.randn(3, 64))
assert y.shape == (3, 32) and torch.isfinite(y).all()
lin8 = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
lin8.load_state_dict({"weight": torch.randn(32, 64)})
assert lin8(torch.randn(2, 64)).shape == (2, 32)
import transformers
cfg = transformers.Glm4MoeConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
    moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    n_routed_experts=4, num_experts_per_tok=2)
m = transformers.Glm4MoeForCausalLM(cfg).eval()
out = m(torch.tensor([[1, 2, 3]])).logits
assert out.shape == (1, 3, 50)
print("OK")
"""


def test_bitsandbytes_and_transformers_work_beside_our_kernels_package():
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    r = subprocess.run(
        [sys.executable, "-c", f"ROOT = {root!r}\n" + SCRIPT],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
