"""The engine's KV cache stack: the L1 pool sized from the EngineConfig, its tiers (built by
runtime/kv/tier_stack.py, the one tier-stack builder) and the scheduler over them
(see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.engine_config import EngineConfig
from runtime.errors import KvscopeError
from runtime.kv.pool import KVPool
from runtime.kv.tier_stack import DiskSpec, TierStack, build_tier_stack, model_fingerprint
from runtime.model_config import ModelConfig
from runtime.scheduler import Scheduler

DEFAULT_L1_CAP = 512 << 20  # default L1 pool cap when --kv-mem is not given


@dataclass
class KVStack(TierStack):
    sched: Scheduler


def build_kv_stack(
    cfg: ModelConfig,
    ec: EngineConfig,
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    copy_hooks=None,
    kv_layers: int | None = None,
    mtp_lookahead: int = 0,
) -> KVStack:
    """``kv_layers``: layers with KV planes (the main layers + a loaded MTP layer; default the
    main layers); ``mtp_lookahead``: see Scheduler."""
    ps = ec.page_size
    n_layers = kv_layers or cfg.num_layers
    probe = KVPool(n_layers, 1, ps, cfg.plane_widths(), dtype, "meta")
    bpp = probe.bytes_per_page
    if ec.kv_mem is not None:
        slots = ec.kv_mem // bpp
    else:
        per_seq = -(-cfg.max_position_embeddings // ps)
        slots = min(ec.max_running * per_seq, max(DEFAULT_L1_CAP // bpp, per_seq))
    if slots < 1:
        raise KvscopeError(f"--kv-mem too small: one KV page needs {bpp} bytes")
    pool = KVPool(n_layers, slots, ps, cfg.plane_widths(), dtype, device)
    disk = None
    if ec.kv_disk is not None:
        fp = model_fingerprint(model_dir, dtype, ps)
        if n_layers != cfg.num_layers:  # pages with MTP rows are another format
            fp += f"+kv{n_layers}"
        disk = DiskSpec(ec.kv_disk, ec.kv_disk_size, fp, (0, n_layers))
    t = build_tier_stack(
        pool,
        device,
        host_bytes=ec.kv_host_mem,
        disk=disk,
        policy=ec.write_policy,
        verify_loads=not ec.unsafe,
        fence_guard=not ec.unsafe,
        copy_hooks=copy_hooks,
    )
    sched = Scheduler(
        t.tiers,
        max_batch_tokens=ec.max_batch_tokens,
        max_running=ec.max_running,
        preempt=ec.preempt,
        mtp_lookahead=mtp_lookahead,
    )
    return KVStack(t.pool, t.alloc, t.tree, t.copier, t.host, t.disk, t.tiers, sched)
