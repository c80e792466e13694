"""One LayerSplit rank's process: rendezvous, load the (replicated) weights, build its tiers,
page tables, drain ledger and compute worker, run the step loop over every request, check that
every page settled, and write its results (rank{r}.pt) for the launcher (runner.py).

Backends: gloo on CPU, NCCL when the rank runs on a CUDA device (LOCAL_RANK picks it).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.errors import KvscopeError
from runtime.kv.allocator import PageState
from runtime.layersplit.collective import Collective
from runtime.layersplit.drain import CrossRankDrain
from runtime.layersplit.loop import LateWriter, RankLoop
from runtime.layersplit.ownership import assign_layers, layer_token_bytes
from runtime.layersplit.pages import RankPages, RankSeq
from runtime.layersplit.rank_tiers import RankTiers, TierConfig
from runtime.layersplit.telemetry import RankTelemetry
from runtime.layersplit.worker import RankWorker
from runtime.model_config import load_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def plan_owners(model_dir, n_ranks: int, dtype: torch.dtype) -> list[tuple[int, ...]]:
    cfg = load_config(model_dir)
    elem = torch.empty((), dtype=dtype).element_size()
    return assign_layers(
        [layer_token_bytes(cfg, li, elem) for li in range(cfg.num_layers)], n_ranks
    )


def _scramble(alloc, rank: int) -> None:
    """Test hook: hand out slots in a rank-specific order (and epochs bumped once), so page
    tables differ across ranks."""
    slots = alloc.alloc("scramble", alloc.num_slots)
    random.Random(1000 + rank).shuffle(slots)
    alloc.unref("scramble", slots)


def _telemetry(rank, w: RankWorker, tiers: RankTiers, pages, drain, coll) -> RankTelemetry:
    c = w.c
    return RankTelemetry(
        rank=rank,
        owned_layers=tiers.layers,
        kv_bytes=tiers.kv_bytes(),
        bcast_bytes_sent=c["bsent"],
        bcast_bytes_recv=c["brecv"],
        bcast_time_s=w.bcast_time,
        bcast_buffer_peak=w.buf_peak,
        gather_bytes_sent=c["gsent"],
        gather_bytes_recv=c["grecv"],
        hop_bytes=c["hop_bytes"],
        hops=c["hops"],
        prefill_tokens=c["prefill"],
        decode_layers=c["decode"],
        kv_pages=tiers.kv_pages(),
        kv_bytes_used=tiers.kv_bytes_used(),
        cached_pages=dict(pages.hits),
        decode_steps=c["decode_steps"],
        decode_tokens=c["decode_tokens"],
        max_batch=c["max_batch"],
        aborts=drain.aborts,
        pages_drained=drain.pages_drained,
        pages_acked=drain.pages_acked,
        agree_rounds=coll.rounds,
        agree_time_s=coll.time_s,
        load_failures=pages.load_failures,
        disk_rejected=tiers.disk.stats["rejected"] if tiers.disk else 0,
    )


def _seqs(spec: dict) -> list[RankSeq]:
    t0 = time.monotonic()
    out = []
    for i, (p, n) in enumerate(zip(spec["prompts"], spec["max_new"], strict=True)):
        timeout = spec["timeouts"][i]
        out.append(
            RankSeq(
                index=i,
                prompt=list(p),
                max_new=n,
                deadline=None if timeout is None else t0 + timeout,
                abort_after=spec["aborts"].get(i),
                tokens=list(p),
            )
        )
    return out


def rank_main(rank: int, world: int, spec: dict) -> None:
    """One rank: rendezvous, load, serve every prompt, write rank{r}.pt into spec["out"]."""
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
        _serve(rank, world, spec, device, build_model, Checkpoint)
        dist.barrier()
    except KvscopeError as e:
        (Path(spec["out"]) / f"error{rank}.txt").write_text(str(e))
        raise
    finally:
        dist.destroy_process_group()


def _serve(rank: int, world: int, spec: dict, device, build_model, checkpoint) -> None:
    hooks = spec.get("hooks") or {}
    dtype = DTYPES[spec.get("dtype", "float32")]
    model_dir = spec["model_dir"]
    cfg = load_config(model_dir)
    model = build_model(cfg, checkpoint(model_dir), dtype, device)
    owners = plan_owners(model_dir, world, dtype)
    tc = TierConfig(
        num_slots=spec["num_slots"],
        page_size=spec["page_size"],
        host_bytes=spec.get("host_bytes"),
        disk_dir=spec.get("disk_dir"),
        disk_bytes=spec.get("disk_bytes", 1 << 30),
        write_policy=spec.get("write_policy", "write_through"),
    )
    tiers = RankTiers(cfg, model_dir, owners, rank, dtype, device, tc)
    if hooks.get("scramble_slots"):
        _scramble(tiers.alloc, rank)
    coll = Collective(world, device)
    drain = CrossRankDrain(tiers.alloc, unsafe=bool(hooks.get("unsafe_drain")))
    pages = RankPages(tiers, coll, drain)
    worker = RankWorker(model, rank, world, owners, tiers.kv)
    late = [
        LateWriter(h["prompt"], h["delay_s"])
        for h in hooks.get("late_writers", ())
        if h["rank"] == rank
    ]
    loop = RankLoop(
        worker,
        pages,
        drain,
        coll,
        spec["max_batch"],
        set(spec.get("eos_ids", ())),
        keep_logits=rank == 0,
        late_writers=late,
    )
    seqs = loop.run(_seqs(spec))
    tiers.close()  # L2 backups and L3 writes land before the process exits
    tiers.tiers.check_invariants()
    states = tiers.alloc.counts()
    settled = {PageState.FREE.value, PageState.CACHED.value}
    busy = {k: v for k, v in states.items() if v and k not in settled}
    assert not busy, f"rank {rank}: pages not settled after the run: {busy}"
    out = {
        "telemetry": _telemetry(rank, worker, tiers, pages, drain, coll),
        "cached": [(s.cached, s.cached_local, s.cached_slowest) for s in seqs],
        "page_tables": [list(s.slots) for s in seqs],
        "drain_log": list(drain.log),
        "alloc_log": list(pages.events),
        "states": states,
        "boundaries": loop.boundary,
    }
    if rank == 0:
        out["tokens"] = [s.tokens[len(s.prompt) :] for s in seqs]
        out["finish"] = [s.finish_reason for s in seqs]
        vocab = cfg.vocab_size
        out["logits"] = [torch.stack(s.logits) if s.logits else torch.empty(0, vocab) for s in seqs]
    torch.save(out, Path(spec["out"]) / f"rank{rank}.pt")
