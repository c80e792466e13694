"""Launching LayerSplit ranks: `run_layer_split` spawns N local ranks (one rank's process:
rank.py) and collects their results; `main` runs one rank under torchrun (env:// rendezvous,
possibly across machines).

Backends: gloo on CPU, NCCL when the ranks run on CUDA devices (one GPU per rank, by
LOCAL_RANK). Every rank loads the full weights (replicated) and keeps KV only for the layers it
owns, in its own HiCache tiers: L1 page pool, optional L2 host pool and L3 disk store, with its
own page allocator (owners, epochs, DRAINING) and radix prefix tree (rank_tiers.py). Requests
are served together, up to `max_batch` decoding at once (loop.py); prefix reuse is agreed
across ranks and aborted requests drain across ranks (pages.py, drain.py). Greedy only.

    torchrun --nproc-per-node 4 -m runtime.layersplit.runner --model DIR --prompts p.json \
        --max-new-tokens 32 --out results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.errors import KvscopeError
from runtime.kv.pool import KVPool
from runtime.layersplit.rank import DTYPES, plan_owners, rank_main
from runtime.layersplit.telemetry import RankTelemetry, layer_owners
from runtime.model_config import load_config

__all__ = ["LayerSplitResult", "default_num_slots", "plan_owners", "rank_main", "run_layer_split"]


@dataclass
class LayerSplitResult:
    tokens: list[list[int]]  # greedy tokens per prompt (partial for aborted / timed out)
    logits: list[torch.Tensor]  # per prompt [generated, V] float32: the logits behind each token
    telemetry: list[RankTelemetry]  # per rank, rank order
    layer_owners: tuple[tuple[int, ...], ...]  # rank -> owned layers (EngineSnapshot field)
    single_rank_kv_bytes: int  # L1 bytes one rank would hold for all layers, same page count
    finish_reasons: list[str] = field(default_factory=list)  # stop | length | abort | timeout
    # per prompt: {"tokens": reused prompt tokens (agreed), "by_tier": the slowest tier any rank
    # served each reused page from, "by_rank": [each rank's own tiers]}
    cached: list[dict] = field(default_factory=list)
    single_rank_page_bytes: int = 0  # one page of every layer and plane on a single rank
    extra: dict = field(default_factory=dict)


def default_num_slots(prompts, max_new: Sequence[int], page_size: int, max_batch: int) -> int:
    """L1 pages per rank so that the `max_batch` largest requests can run at once."""
    need = sorted(
        (math.ceil((len(p) + n) / page_size) for p, n in zip(prompts, max_new, strict=True)),
        reverse=True,
    )
    return max(1, sum(need[:max_batch]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise KvscopeError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def run_layer_split(
    model_dir,
    n_ranks: int,
    prompts: list[list[int]],
    max_new_tokens: int | Sequence[int],
    page_size: int = 16,
    dtype: str = "float32",
    device: str = "cpu",
    eos_ids=(),
    threads: int = 1,
    *,
    max_batch: int = 16,
    num_slots: int | None = None,
    host_bytes: int | None = None,
    disk_dir: str | os.PathLike | None = None,
    disk_bytes: int = 1 << 30,
    write_policy: str = "write_through",
    timeout_s: float | Sequence[float | None] | None = None,
    aborts: dict[int, int] | None = None,
    hooks: dict | None = None,
) -> LayerSplitResult:
    """Spawn n_ranks local processes (gloo on CPU, NCCL on CUDA) and serve every prompt (token
    ids) under LayerSplit: up to `max_batch` decoded together, greedy, each rank's KV in its
    own tiers (L1 `num_slots` pages; L2 `host_bytes` per rank; L3 under `disk_dir`).
    `timeout_s` (one or per prompt) ends a request after that many seconds from submission;
    `aborts` {prompt index: n} aborts a prompt once it generated n tokens (0: before it
    starts). `hooks` (tests): scramble_slots, late_writers [{rank, prompt, delay_s}],
    unsafe_drain."""
    import torch.multiprocessing as mp

    if n_ranks < 1 or not prompts or max_batch < 1:
        raise KvscopeError("run_layer_split: needs n_ranks >= 1, prompts and max_batch >= 1")
    max_new = [int(n) for n in _per_prompt(max_new_tokens, len(prompts), "max_new_tokens")]
    if min(max_new) < 1 or min(len(p) for p in prompts) < 1:
        raise KvscopeError("run_layer_split: every prompt needs >= 1 token and max_new >= 1")
    if device == "cuda" and torch.cuda.device_count() < n_ranks:
        raise KvscopeError(f"{n_ranks} ranks need {n_ranks} GPUs")
    if num_slots is None:
        num_slots = default_num_slots(prompts, max_new, page_size, max_batch)
    with tempfile.TemporaryDirectory(prefix="layersplit-") as tmp:
        spec = dict(
            model_dir=str(model_dir),
            prompts=[list(map(int, p)) for p in prompts],
            max_new=max_new,
            page_size=page_size,
            num_slots=num_slots,
            dtype=dtype,
            device=device,
            eos_ids=sorted(eos_ids),
            threads=threads,
            out=tmp,
            max_batch=max_batch,
            host_bytes=host_bytes,
            disk_dir=None if disk_dir is None else str(disk_dir),
            disk_bytes=disk_bytes,
            write_policy=write_policy,
            timeouts=_per_prompt(timeout_s, len(prompts), "timeout_s"),
            aborts=dict(aborts or {}),
            hooks=dict(hooks or {}),
        )
        _spawn(mp, n_ranks, spec, tmp)
        outs = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(n_ranks)]
    cfg = load_config(model_dir)
    single = KVPool(cfg.num_layers, num_slots, page_size, cfg.plane_widths(), DTYPES[dtype])
    tel = [o["telemetry"] for o in outs]
    cached = []
    for i in range(len(prompts)):
        tokens, _, slowest = outs[0]["cached"][i]
        cached.append(
            {"tokens": tokens, "by_tier": slowest, "by_rank": [o["cached"][i][1] for o in outs]}
        )
    return LayerSplitResult(
        tokens=outs[0]["tokens"],
        logits=outs[0]["logits"],
        telemetry=tel,
        layer_owners=layer_owners(tel),
        single_rank_kv_bytes=single.total_bytes,
        finish_reasons=outs[0]["finish"],
        cached=cached,
        single_rank_page_bytes=single.bytes_per_page,
        extra={
            "num_slots": num_slots,
            "page_size": page_size,
            "page_tables": [o["page_tables"] for o in outs],
            "drain_logs": [o["drain_log"] for o in outs],
            "alloc_logs": [o["alloc_log"] for o in outs],
            "page_states": [o["states"] for o in outs],
            "boundaries": outs[0]["boundaries"],
        },
    )


def _spawn(mp, n_ranks: int, spec: dict, tmp: str) -> None:
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    try:
        mp.spawn(rank_main, args=(n_ranks, spec), nprocs=n_ranks, join=True)
    except mp.ProcessRaisedException:
        errors = sorted(Path(tmp).glob("error*.txt"))
        if errors:  # a bad input every rank agreed on: one line, not a traceback
            raise KvscopeError(errors[0].read_text()) from None
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the environment."""
    p = argparse.ArgumentParser(prog="python -m runtime.layersplit.runner")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--kv-host-bytes", type=int, help="L2 host pool bytes per rank")
    p.add_argument("--kv-disk", help="L3 directory (one subdirectory per split and rank)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="directory for rank{r}.pt results")
    a = p.parse_args(argv)
    prompts = json.loads(Path(a.prompts).read_text())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    max_new = [a.max_new_tokens] * len(prompts)
    spec = dict(
        model_dir=a.model,
        prompts=prompts,
        max_new=max_new,
        page_size=a.page_size,
        num_slots=default_num_slots(prompts, max_new, a.page_size, a.max_batch),
        dtype=a.dtype,
        device=a.device,
        out=a.out,
        max_batch=a.max_batch,
        host_bytes=a.kv_host_bytes,
        disk_dir=a.kv_disk,
        timeouts=[None] * len(prompts),
        aborts={},
    )
    rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
