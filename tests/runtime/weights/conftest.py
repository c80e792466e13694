"""Weights tests run torch single-threaded: the tiny models gain nothing from a second thread, and
on a shared, loaded machine OpenMP's spinning barriers made a 0.2 s generation take 18 s."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
