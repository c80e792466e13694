"""Shared LayerSplit test helpers: the one-rank greedy reference (the model's own forward)."""

from __future__ import annotations

import functools

import pytest
import torch

from runtime.kv.pool import KVPool, token_rows
from runtime.model_config import load_config
from runtime.models import build_model
from runtime.models.batch import ForwardBatch, SeqChunk
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.tiny import write_tiny


@functools.cache
def _model(model_dir: str):
    cfg = load_config(model_dir)
    return cfg, build_model(cfg, Checkpoint(model_dir), torch.float32, "cpu")


@functools.cache
def _reference(model_dir: str, prompt: tuple[int, ...], n_new: int, page: int):
    """Greedy tokens and their logits [n_new, V] from the model's own forward on one rank
    (scattered pages, one token per step after the prompt)."""
    cfg, model = _model(model_dir)
    n_pages = -(-(len(prompt) + n_new) // page)
    pool = KVPool(cfg.num_layers, n_pages, page, cfg.plane_widths(), torch.float32)
    pages = list(range(n_pages))[::-1]
    toks, logits, start = list(prompt), [], 0
    with torch.inference_mode():
        for _ in range(n_new):
            end = len(toks)
            rows = token_rows(pages, 0, end, page)
            batch = ForwardBatch(
                torch.tensor(toks[start:end]),
                torch.arange(start, end),
                rows[start:end],
                [SeqChunk(start, end, 0, rows)],
            )
            logits.append(model.forward(batch, pool)[0])
            toks.append(int(logits[-1].argmax()))
            start = end
    return toks[len(prompt) :], torch.stack(logits)


@pytest.fixture(scope="session")
def greedy_reference():
    """reference(model_dir, prompt, n_new, page) -> (tokens, logits [n_new, V]); cached."""

    def ref(model_dir, prompt, n_new: int, page: int):
        return _reference(str(model_dir), tuple(prompt), n_new, page)

    return ref


@pytest.fixture(scope="session")
def dsa5(tmp_path_factory):
    """Tiny glm_moe_dsa with 5 layers (full/shared alternating): not divisible by 2 or 3."""
    return write_tiny(tmp_path_factory.mktemp("ls_dsa5"), "glm_moe_dsa", num_hidden_layers=5)
