"""Backend choice and packaging: ops dispatch, a light `import kernels` (bitsandbytes and
transformers probe that name; tests/test_import_names.py checks they still work beside ours),
Triton launches on CPU when triton was imported first without the interpreter, and the GPU build
of the kernels (compiled for sm_90 without a GPU)."""

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
    assert ops.implementation("rmsnorm", cpu) is reference_rmsnorm
    refs = {name: ops.implementation(name, cpu) for name in ops.__all__}
    assert all(f.__name__ == f"reference_{name}" for name, f in refs.items())
    monkeypatch.setenv("KVSCOPE_TRITON_INTERPRET", "1")
    assert backend.use_triton(cpu)
    assert ops.implementation("rmsnorm", cpu) is rmsnorm
    assert all(ops.implementation(name, cpu).__name__ == name for name in ops.__all__)
    assert backend.use_triton(torch.device("cuda"))
    with pytest.raises(AttributeError, match="no op"):
        ops.not_an_op  # noqa: B018


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
        "import sys, kernels\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules\n"
        "import kernels.ops\n"
        "assert 'triton' not in sys.modules  # op modules load on first use\n"
    )
    assert r.returncode == 0, r.stderr[-2000:]


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
        "torch.testing.assert_close(rmsnorm(x, w)[0].float(), reference_rmsnorm(x, w)[0].float(),"
        " atol=1e-5, rtol=1.6e-2)\n"
        "p = torch.randn(3, 4, 8)\n"
        "assert torch.equal(page_checksum(p), reference_page_checksum(p))\n"
        "assert isinstance(tl.sum, JITFunction)  # restored\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_kernels_compile_for_sm90():
    """What the interpreter cannot check: the kernels as the wrappers launch them at GPU sizes
    (bf16 attention, MoE decode and prefill tiles, the uint32 checksum) build for sm_90 within
    the shared-memory limit. The full set: kvscope gpu-check --compile 90."""
    pytest.importorskip("triton.backends.nvidia")
    r = _run(
        "import sys\n"
        "from app.gpu_check import main\n"
        "sys.exit(main(['--compile', '90', '--kernels', 'attention bf16', 'fused_moe',"
        " 'page_checksum']))\n"
    )
    assert r.returncode == 0 and "all compiled" in r.stdout, (r.stdout + r.stderr)[-3000:]
