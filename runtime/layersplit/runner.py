"""Launching LayerSplit ranks: `run_layer_split` spawns N local ranks; `main` runs one rank
under torchrun (env:// rendezvous, possibly across machines).

Backends: gloo on CPU, NCCL when the ranks run on CUDA devices (one GPU per rank, by
LOCAL_RANK). Every rank loads the full weights (replicated) and keeps KV only for the layers it
owns (runtime/layersplit/ownership.py). Greedy decoding only; no HiCache tiers in this mode.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.config import load_config
from runtime.kv.pool import KVPool
from runtime.layersplit.ownership import assign_layers, layer_token_bytes
from runtime.layersplit.telemetry import RankTelemetry, layer_owners
from runtime.layersplit.worker import RankWorker

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LayerSplitResult:
    tokens: list[list[int]]  # greedy tokens per prompt
    logits: list[torch.Tensor]  # per prompt [generated, V] float32: the logits behind each token
    telemetry: list[RankTelemetry]  # per rank, rank order
    layer_owners: tuple[tuple[int, ...], ...]  # rank -> owned layers (EngineSnapshot field)
    single_rank_kv_bytes: int  # L1 bytes one rank would hold for all layers, same page count
    extra: dict = field(default_factory=dict)


def plan_owners(model_dir, n_ranks: int, dtype: torch.dtype) -> list[tuple[int, ...]]:
    cfg = load_config(model_dir)
    elem = torch.empty((), dtype=dtype).element_size()
    return assign_layers(
        [layer_token_bytes(cfg, li, elem) for li in range(cfg.num_layers)], n_ranks
    )


def _num_slots(prompts, max_new_tokens: int, page_size: int) -> int:
    longest = max(len(p) for p in prompts) + max_new_tokens
    return math.ceil(longest / page_size)


def rank_main(rank: int, world: int, spec: dict) -> None:
    """One rank: rendezvous, load, generate every prompt, write rank{r}.pt into spec["out"]."""
    from runtime.models import build_model
    from runtime.weights.checkpoint import Checkpoint

    torch.set_num_threads(spec.get("threads", 1))
    cuda = spec.get("device", "cpu") == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    backend = spec.get("backend") or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
    try:
        dtype = _DTYPES[spec.get("dtype", "float32")]
        model_dir = spec["model_dir"]
        model = build_model(load_config(model_dir), Checkpoint(model_dir), dtype, device)
        owners = plan_owners(model_dir, world, dtype)
        w = RankWorker(model, rank, world, owners, spec["num_slots"], spec["page_size"])
        eos = set(spec.get("eos_ids", ()))
        results = [w.generate(p, spec["max_new_tokens"], eos) for p in spec["prompts"]]
        out = {"telemetry": w.telemetry()}
        if rank == 0:
            out["tokens"] = [t for t, _ in results]
            out["logits"] = [torch.stack(lg).cpu() for _, lg in results]
        torch.save(out, Path(spec["out"]) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layer_split(
    model_dir,
    n_ranks: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    page_size: int = 16,
    dtype: str = "float32",
    device: str = "cpu",
    eos_ids=(),
    threads: int = 1,
) -> LayerSplitResult:
    """Spawn n_ranks local processes (gloo on CPU, NCCL on CUDA), run greedy generation of
    every prompt (token ids) under LayerSplit, and collect tokens, logits and telemetry."""
    import torch.multiprocessing as mp

    assert n_ranks >= 1 and prompts and max_new_tokens >= 1
    if device == "cuda":
        assert torch.cuda.device_count() >= n_ranks, f"{n_ranks} ranks need {n_ranks} GPUs"
    num_slots = _num_slots(prompts, max_new_tokens, page_size)
    with tempfile.TemporaryDirectory(prefix="layersplit-") as tmp:
        spec = dict(
            model_dir=str(model_dir),
            prompts=[list(map(int, p)) for p in prompts],
            max_new_tokens=max_new_tokens,
            page_size=page_size,
            num_slots=num_slots,
            dtype=dtype,
            device=device,
            eos_ids=sorted(eos_ids),
            threads=threads,
            out=tmp,
        )
        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        try:
            mp.spawn(rank_main, args=(n_ranks, spec), nprocs=n_ranks, join=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        outs = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(n_ranks)]
    cfg = load_config(model_dir)
    single = KVPool(cfg.num_layers, num_slots, page_size, cfg.plane_widths(), _DTYPES[dtype])
    tel = [o["telemetry"] for o in outs]
    return LayerSplitResult(
        tokens=outs[0]["tokens"],
        logits=outs[0]["logits"],
        telemetry=tel,
        layer_owners=layer_owners(tel),
        single_rank_kv_bytes=single.total_bytes,
        extra={"num_slots": num_slots, "page_size": page_size},
    )


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the environment."""
    p = argparse.ArgumentParser(prog="python -m runtime.layersplit.runner")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="directory for rank{r}.pt results")
    a = p.parse_args(argv)
    prompts = json.loads(Path(a.prompts).read_text())
    Path(a.out).mkdir(parents=True, exist_ok=True)
    spec = dict(
        model_dir=a.model,
        prompts=prompts,
        max_new_tokens=a.max_new_tokens,
        page_size=a.page_size,
        num_slots=_num_slots(prompts, a.max_new_tokens, a.page_size),
        dtype=a.dtype,
        device=a.device,
        out=a.out,
    )
    rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
