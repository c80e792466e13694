"""Backend choice and packaging: ops dispatch, a light `import kernels` that bitsandbytes and
transformers can probe, and Triton launches on CPU when triton was imported first without the
interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import backend, ops
from kernels.rmsnorm import reference_rmsnorm, rmsnorm

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.endswith("TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dispatch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("KVSCOPE_TRITON_INTERPRET", raising=False)
    assert not backend.use_triton(cpu)
    assert ops._impl("rmsnorm", "rmsnorm", cpu) is reference_rmsnorm
    monkeypatch.setenv("KVSCOPE_TRITON_INTERPRET", "1")
    assert backend.use_triton(cpu)
    assert ops._impl("rmsnorm", "rmsnorm", cpu) is rmsnorm
    assert backend.use_triton(torch.device("cuda"))


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_ops_on_cpu(interpret, monkeypatch):
    monkeypatch.setenv("KVSCOPE_TRITON_INTERPRET", interpret)
    x = torch.randn(3, 40)
    out, res = ops.rmsnorm(x, torch.ones(40), 1e-6, x)
    torch.testing.assert_close(out, reference_rmsnorm(x, torch.ones(40), 1e-6, x)[0])
    plane = torch.randn(4, 2, 8)
    assert torch.equal(ops.page_gather(plane, [2, 0]), plane[[2, 0]])


def test_import_kernels_is_light_and_not_hf_kernels():
    assert not hasattr(kernels, "get_kernel") and not hasattr(kernels, "__version__")
    r = _run(
        "import sys, kernels, kernels.ops\n"
        "heavy = [m for m in ('torch', 'triton') if m in sys.modules]\n"
        "assert heavy == ['torch'] or not heavy, heavy\n"
        "import kernels as k; assert 'triton' not in sys.modules\n"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("import sys, kernels; assert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr[-2000:]


def test_bitsandbytes_and_transformers_beside_our_kernels():
    """shared/TRAPS.md: both probe `import kernels` for the HF package; they must still work."""
    r = _run(
        "import bitsandbytes, transformers, torch\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa\n"
        "lin = bitsandbytes.nn.Linear8bitLt(8, 8, has_fp16_weights=False)\n"
        "import kernels.ops; print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_launch_after_triton_was_imported_without_interpreter():
    """The full suite imports triton (via bitsandbytes) before tests/kernels/conftest.py can set
    TRITON_INTERPRET; launches on CPU tensors must still run, through the interpreter."""
    r = _run(
        "import triton, triton.language as tl, torch\n"
        "from triton.runtime.jit import JITFunction\n"
        "assert isinstance(tl.sum, JITFunction)\n"
        "from kernels.rmsnorm import rmsnorm, reference_rmsnorm\n"
        "from kernels.page_checksum import page_checksum, reference_page_checksum\n"
        "x = torch.randn(3, 40).bfloat16(); w = torch.randn(40).bfloat16()\n"
        "assert torch.equal(rmsnorm(x, w)[0], reference_rmsnorm(x, w)[0]) or torch.allclose(\n"
        "    rmsnorm(x, w)[0].float(), reference_rmsnorm(x, w)[0].float(), rtol=1.6e-2)\n"
        "p = torch.randn(3, 4, 8)\n"
        "assert torch.equal(page_checksum(p), reference_page_checksum(p))\n"
        "assert isinstance(tl.sum, JITFunction)  # restored\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
