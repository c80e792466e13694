"""pytest-benchmark suite for the kernels and the scheduler: `make bench`, i.e.
`pytest -q tests/bench --benchmark-only`.

Every test here skips unless --benchmark-only is given, so the normal `make test` run (which
collects every directory) does not spend minutes calibrating timings. Ops are called through
kernels.ops: the Triton kernels on CUDA, the torch references on CPU. Sizes are GLM-5 / GLM-4.5
layer shapes on CUDA (bf16) and the demo model's shapes on CPU (fp32).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from runtime.weights.tiny import write_tiny

HAS_CUDA = torch.cuda.is_available()

# The demo model's shape (read from the shipped assets/demo/config.json), random weights:
# the CPU engine benchmarks.
_DEMO_CONFIG = Path(__file__).resolve().parents[2] / "assets" / "demo" / "config.json"
DEMO_SHAPE = {
    k: v
    for k, v in json.loads(_DEMO_CONFIG.read_text()).items()
    if k not in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")
}


def pytest_collection_modifyitems(config, items):
    """Outside --benchmark-only every test here is skipped before any fixture is set up."""
    if config.getoption("benchmark_only", False):
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="benchmark: run with --benchmark-only (make bench)")
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _threads():
    """KVSCOPE_BENCH_THREADS torch threads (default 1: on a shared 2-core machine two intra-op
    threads stall each other; see docs/performance.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("KVSCOPE_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sync():
    """Call after the op inside a timed function so CUDA work is counted."""
    return torch.cuda.synchronize if HAS_CUDA else (lambda: None)


@pytest.fixture(scope="session")
def demo_shaped(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("demo_shaped"), "glm_moe_dsa", **DEMO_SHAPE)


@pytest.fixture(scope="session")
def tiny_glm4_bench(tmp_path_factory):
    return write_tiny(
        tmp_path_factory.mktemp("glm4_bench"), "glm4_moe", max_position_embeddings=2048
    )
