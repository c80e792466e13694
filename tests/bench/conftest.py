"""pytest-benchmark suite for the kernels and the scheduler: `make bench`, i.e.
`pytest -q tests/bench --benchmark-only`.

Every test here skips unless --benchmark-only is given, so the normal `make test` run (which
collects every directory) does not spend minutes calibrating timings. Ops are called through
kernels.ops: the Triton kernels on CUDA, the torch references on CPU. Sizes are GLM-5 / GLM-4.5
layer shapes on CUDA (bf16) and the demo model's shapes on CPU (fp32).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runtime.weights.tiny import write_tiny

HAS_CUDA = torch.cuda.is_available()

# The demo model's shape (assets/build_demo.py), random weights: the CPU engine benchmarks.
DEMO_SHAPE = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    index_topk=32,
    index_n_heads=8,
    index_head_dim=32,
    indexer_types=["full", "shared", "full", "shared"],
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    max_position_embeddings=2048,
)


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
