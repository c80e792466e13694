"""Shared fixtures: tiny random checkpoints written by our own writer."""

from __future__ import annotations

import os

import pytest
import torch

from runtime.weights.tiny import write_tiny

torch.set_num_threads(1)  # 2 shared cores: spin-waiting threads slow tiny models down
# Engines in tests decode eagerly unless a test turns the compiled CPU decode graph on
# (tests/runtime/test_cpu_graph.py): a background compile per engine would cost minutes.
os.environ.setdefault("KVSCOPE_CPU_GRAPH", "0")


@pytest.fixture(scope="session")
def tiny_dsa(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny_dsa"), "glm_moe_dsa")


@pytest.fixture(scope="session")
def tiny_glm4(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny_glm4"), "glm4_moe")


@pytest.fixture(scope="session")
def tiny_dsa_mtp(tmp_path_factory):
    """tiny_dsa's main weights plus one MTP layer (index num_hidden_layers)."""
    return write_tiny(tmp_path_factory.mktemp("tiny_dsa_mtp"), "glm_moe_dsa", mtp=1)


@pytest.fixture(scope="session")
def tiny_glm4_mtp(tmp_path_factory):
    """tiny_glm4's main weights plus one MTP layer (index num_hidden_layers)."""
    return write_tiny(tmp_path_factory.mktemp("tiny_glm4_mtp"), "glm4_moe", mtp=1)


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory, monkeypatch):
    """Tests never write into the user's cache: the demo defaults put L3 under
    $XDG_CACHE_HOME/kvscope (app/cache_defaults.py)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


@pytest.fixture
def torch_kernels(monkeypatch):
    """int8 / int4 weights through torch's packed kernels (runtime/weights/quant_cpu.py), not
    kvscope's own VNNI kernels (kernels/cpu_quant.py), whichever this CPU would pick."""
    from kernels import cpu_quant

    monkeypatch.setattr(cpu_quant, "available", lambda: False)


def q4_kernels_or_skip():
    """Skip (with the reason) where kvscope's VNNI CPU kernels cannot run on this machine."""
    from kernels import cpu_quant

    if not cpu_quant.available():
        pytest.skip(f"kvscope VNNI kernels unavailable: {cpu_quant.unavailable_reason()}")
