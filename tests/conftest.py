"""Shared fixtures: tiny random checkpoints written by our own writer."""

from __future__ import annotations

import pytest
import torch

from runtime.weights.tiny import write_tiny

torch.set_num_threads(1)  # 2 shared cores: spin-waiting threads slow tiny models down


@pytest.fixture(scope="session")
def tiny_dsa(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny_dsa"), "glm_moe_dsa")


@pytest.fixture(scope="session")
def tiny_glm4(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny_glm4"), "glm4_moe")
