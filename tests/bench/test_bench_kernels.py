"""Kernels through kernels.ops (Triton on CUDA, torch references on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels import ops

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def size(gpu: int, cpu: int) -> int:
    """GLM-5 / GLM-4.5 layer sizes on CUDA, the demo model's on CPU."""
    return gpu if HAS_CUDA else cpu


def _rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)


def _paged(rows: int, page: int, width: tuple[int, ...], batch: int):
    """A shuffled page pool holding `batch` sequences of `rows` tokens each."""
    pages = -(-rows // page)
    slots = batch * pages + 8
    plane = _rand(slots, page, *width)
    pt = torch.randperm(slots, device=DEVICE)[: batch * pages].view(batch, pages).to(torch.int32)
    lens = torch.full((batch,), rows, dtype=torch.int32, device=DEVICE)
    return plane, pt, lens


@pytest.mark.parametrize("tokens", [1, 128])
def test_rmsnorm(benchmark, sync, tokens):
    x = _rand(tokens, size(6144, 256))
    w, r = _rand(x.shape[1]), torch.randn_like(x)
    benchmark(lambda: (ops.rmsnorm(x, w, 1e-5, r), sync()))


def test_rope_interleave(benchmark, sync):
    t, h, r = size(256, 128), size(64, 4), size(64, 16)
    x = _rand(t, h, r)
    ang = torch.rand(t, r // 2, device=DEVICE) * 100
    cos, sin = torch.cat([ang, ang], -1).cos().to(DTYPE), torch.cat([ang, ang], -1).sin().to(DTYPE)
    benchmark(lambda: (ops.rope_interleave(x, cos, sin), sync()))


def test_rope_neox(benchmark, sync):
    t, h, d = size(256, 128), size(96, 6), size(128, 12)
    x = _rand(t, h, d)
    ang = torch.rand(t, d // 4, device=DEVICE) * 100
    cos, sin = torch.cat([ang, ang], -1).cos().to(DTYPE), torch.cat([ang, ang], -1).sin().to(DTYPE)
    benchmark(lambda: (ops.rope_neox(x, cos, sin), sync()))


@pytest.mark.parametrize("tokens", [1, 128])
def test_page_store(benchmark, sync, tokens):
    slots, w = size(4096, 256), size(576, 80)
    plane = torch.zeros(slots, 64, w, device=DEVICE, dtype=DTYPE)
    rows = torch.randperm(slots * 64, device=DEVICE)[:tokens]
    vals = _rand(tokens, w)
    benchmark(lambda: (ops.page_store(plane, rows, vals), sync()))


def test_page_gather(benchmark, sync):
    slots = size(4096, 256)
    plane = _rand(slots, 64, size(576, 80))
    ids = torch.randperm(slots, device=DEVICE)[: size(256, 32)]
    buf = ops.page_gather(plane, ids)
    benchmark(lambda: (ops.page_gather(plane, ids, out=buf), sync()))


def test_page_checksum(benchmark, sync):
    slots = size(1024, 32)
    plane = _rand(slots, 64, size(576, 80))
    ids = torch.arange(slots, device=DEVICE)
    benchmark(lambda: (ops.page_checksum(plane, ids), sync()))


def test_dsa_indexer_topk(benchmark, sync):
    s, b, hi, di = size(16384, 1024), size(4, 1), size(32, 8), size(128, 32)
    plane, pt, lens = _paged(s, 64, (di,), b)
    q = _rand(b, hi, di)
    w = torch.randn(b, hi, device=DEVICE) * hi**-0.5
    seq = torch.arange(b, dtype=torch.int32, device=DEVICE)
    kw = dict(scale=di**-0.5, topk=size(2048, 32), max_len=s)
    benchmark(lambda: (ops.dsa_indexer_topk(q, w, plane, pt, seq, lens, **kw), sync()))


@pytest.mark.parametrize("batch", [1, 8])
def test_mla_decode(benchmark, sync, batch):
    s, k, h = size(8192, 1024), size(2048, 32), size(64, 4)
    lat, r, nd, vd = size(512, 64), size(64, 16), size(192, 32), size(256, 32)
    plane, pt, _ = _paged(s, 64, (lat + r,), batch)
    q_nope, q_rope = _rand(batch, h, nd), _rand(batch, h, r)
    w_uk, w_uv = _rand(h, nd, lat, scale=nd**-0.5), _rand(h, vd, lat, scale=lat**-0.5)
    topk = torch.stack([torch.randperm(s, device=DEVICE)[:k] for _ in range(batch)])
    args = (q_nope, q_rope, plane, pt, topk.to(torch.int32), w_uk, w_uv)
    benchmark(lambda: (ops.mla_decode(*args, scale=(nd + r) ** -0.5), sync()))


@pytest.mark.parametrize("batch", [1, 8])
def test_gqa_decode(benchmark, sync, batch):
    s, hkv, hq, d = size(4096, 1024), size(8, 2), size(96, 6), size(128, 12)
    kc, pt, lens = _paged(s, 64, (hkv, d), batch)
    vc = torch.randn_like(kc)
    q = _rand(batch, hq, d)
    benchmark(lambda: (ops.gqa_decode(q, kc, vc, pt, lens, scale=d**-0.5), sync()))


@pytest.mark.parametrize("tokens", [1, 8, 128])
def test_fused_moe(benchmark, sync, tokens):
    e, k, d, i = size(32, 8), size(8, 2), size(6144, 256), size(2048, 128)
    x = _rand(tokens, d)
    wgu, wd = _rand(e, 2 * i, d, scale=d**-0.5), _rand(e, d, i, scale=i**-0.5)
    ids = torch.stack([torch.randperm(e, device=DEVICE)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, device=DEVICE)
    benchmark(lambda: (ops.fused_moe(x, wgu, wd, ids, w), sync()))
