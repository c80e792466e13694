"""Placement: --expert-cache parsing, footprints, the fit check and its one-line errors (CPU and,
with a CUDA device named but never touched, the GPU budget), accelerate's device map, CLI wiring."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from app.options import add_common, engine_config
from runtime.engine import Engine, EngineConfig
from runtime.errors import KvscopeError
from runtime.model_config import load_config
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.placement import LoadOptions, WeightPlan, footprint, parse_expert_cache
from runtime.weights.quant import linear_nbytes


@pytest.mark.parametrize(
    "text,want",
    [
        ("16", ("experts", 16)),
        ("25%", ("fraction", 0.25)),
        ("2G", ("bytes", 2 * 10**9)),
        ("512MiB", ("bytes", 512 * 2**20)),
        ("1.5KB", ("bytes", 1500)),
    ],
)
def test_parse_expert_cache(text, want):
    assert parse_expert_cache(text) == want


@pytest.mark.parametrize("text", ["0", "0%", "150%", "lots", "-3"])
def test_parse_expert_cache_rejects(text):
    with pytest.raises(KvscopeError, match="--expert-cache"):
        parse_expert_cache(text)


def _plan(d, device="cpu", dtype=torch.float32, **kw):
    return WeightPlan(LoadOptions(**kw), load_config(d), Checkpoint(d), dtype, device)


def test_footprint_counts_every_weight_once(tiny_dsa):
    ck = Checkpoint(tiny_dsa)
    total = sum(math.prod(ck.shape(k)) for k in ck.keys()) * 4
    fp = footprint(load_config(tiny_dsa), ck, torch.float32, "none")
    assert fp.non_expert + fp.experts == total
    assert fp.num_experts == 3 * 8 and fp.expert == 3 * 24 * 48 * 4
    q = footprint(load_config(tiny_dsa), ck, torch.float32, "int4")
    assert q.embed == fp.embed  # embeddings stay full; the LM head is stored int8
    cfg = load_config(tiny_dsa)
    norm = cfg.hidden_size * 4
    assert q.head == linear_nbytes(cfg.vocab_size, cfg.hidden_size, "int8", torch.float32) + norm
    assert q.expert < fp.expert / 5 and q.non_expert < fp.non_expert


def test_expert_cache_sizes(tiny_dsa):
    fp = _plan(tiny_dsa).fp
    assert _plan(tiny_dsa, expert_cache="5").capacity == 5
    assert _plan(tiny_dsa, expert_cache="25%").capacity == 6
    assert _plan(tiny_dsa, expert_cache=f"{3 * fp.expert + 7}B").capacity == 3
    assert _plan(tiny_dsa, expert_cache="1000").capacity == 24  # clamped to all experts
    with pytest.raises(KvscopeError, match="smaller than one expert"):
        _plan(tiny_dsa, expert_cache="10B")


def test_cpu_fit_error_says_what_would_fit(tiny_dsa):
    need = _plan(tiny_dsa).needs()["host"]
    budget = need - 5 * _plan(tiny_dsa).fp.expert
    with pytest.raises(KvscopeError) as err:
        Engine(tiny_dsa, EngineConfig(device="cpu", dtype="float32", cpu_mem=budget))
    msg = str(err.value)
    assert "\n" not in msg and "--cpu-mem allows" in msg, msg
    n = int(msg.split("--expert-cache ")[1].split()[0])
    assert n == 24 - 5  # the suggestion is exact ...
    e = Engine(tiny_dsa, EngineConfig(device="cpu", dtype="float32", cpu_mem=budget,
                                      expert_cache=str(n)))  # fmt: skip
    assert e.weight_plan.tier == "mmap"  # ... and loads
    with pytest.raises(KvscopeError, match="with --quant int4"):
        _plan(tiny_dsa, cpu_mem=1000)


def test_gpu_budget_is_checked_before_touching_the_device(tiny_glm4):
    fp = _plan(tiny_glm4, dtype=torch.bfloat16).fp
    gpu = fp.non_expert + fp.experts // 2
    with pytest.raises(KvscopeError, match="--gpu-mem allows .*fits with --expert-cache"):
        _plan(tiny_glm4, "cuda", torch.bfloat16, gpu_mem=gpu, cpu_mem=10**9)
    p = _plan(tiny_glm4, "cuda", torch.bfloat16, gpu_mem=gpu, cpu_mem=10**9, expert_cache="4")
    assert p.tier == "host" and p.needs() == {
        "device": fp.non_expert + 4 * fp.expert,
        "host": fp.experts,
    }
    p = _plan(tiny_glm4, "cuda", torch.bfloat16, gpu_mem=gpu, cpu_mem=100, expert_cache="4")
    assert p.tier == "mmap"  # pinned host copies would not fit: map the checkpoint instead


def test_accelerate_device_map(tiny_dsa):
    p = _plan(tiny_dsa)
    layers = p.fp.layers
    fits = p.fp.embed + sum(layers[:2]) + max(layers) + 1
    dm = p.device_map({0: fits, "cpu": 10**9})
    assert set(dm.values()) <= {0, "cpu"} and dm["embed"] == 0 and "cpu" in dm.values()
    assert p.device_map({"cpu": 10**9}) == {"": "cpu"}


def test_cli_flags_reach_the_engine_config(tiny_glm4):
    parser = argparse.ArgumentParser()
    add_common(parser)
    args = parser.parse_args(
        ["--model", str(tiny_glm4), "--quant", "int4", "--expert-cache", "25%",
         "--cpu-mem", "2GiB", "--gpu-mem", "1G"]
    )  # fmt: skip
    cfg = engine_config(args)
    assert (cfg.quant, cfg.expert_cache, cfg.cpu_mem, cfg.gpu_mem) == ("int4", "25%", 2**31, 10**9)
    bad = parser.parse_args(["--model", str(tiny_glm4), "--expert-cache", "many"])
    with pytest.raises(KvscopeError, match="--expert-cache"):
        engine_config(bad)
