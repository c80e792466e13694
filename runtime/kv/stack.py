"""Wires the KV tiers for one engine: L1 pool + allocator, radix tree, L2 host pool,
L3 disk store, copy engine, tier controller and scheduler (see docs/architecture.md).

The L1 pool's accessors wait on load fences inside `KVPool.gather` through `read_guard`
(invariant 2): a reader cannot skip the wait by forgetting to call it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.config import ModelConfig
from runtime.engine_config import EngineConfig
from runtime.errors import KvscopeError
from runtime.kv.allocator import PageAllocator
from runtime.kv.copy_engine import CopyEngine
from runtime.kv.disk_store import DiskStore
from runtime.kv.host_pool import HostPool, plane_specs
from runtime.kv.pool import KVPool
from runtime.kv.radix import RadixTree
from runtime.kv.tier_controller import TierController
from runtime.scheduler import Scheduler

DEFAULT_L1_CAP = 512 << 20  # default L1 pool cap when --kv-mem is not given


def model_fingerprint(model_dir: Path, dtype: torch.dtype, page_size: int) -> str:
    """Identifies the bytes a KV page depends on: config, weights (size + head/tail sample),
    dtype and page size. An L3 file with another fingerprint is a miss."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    h.update(f"{dtype}:{page_size}".encode())
    return h.hexdigest()[:32]


@dataclass
class KVStack:
    pool: KVPool
    alloc: PageAllocator
    tree: RadixTree
    copier: CopyEngine
    host: HostPool | None
    disk: DiskStore | None
    tiers: TierController
    sched: Scheduler

    def close(self) -> None:
        self.tiers.drain()
        self.copier.close()


def build_kv_stack(
    cfg: ModelConfig,
    ec: EngineConfig,
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    copy_hooks=None,
) -> KVStack:
    ps = ec.page_size
    probe = KVPool(cfg.num_layers, 1, ps, cfg.plane_widths(), dtype, "meta")
    bpp = probe.bytes_per_page
    if ec.kv_mem is not None:
        slots = ec.kv_mem // bpp
    else:
        per_seq = -(-cfg.max_position_embeddings // ps)
        slots = min(ec.max_running * per_seq, max(DEFAULT_L1_CAP // bpp, per_seq))
    if slots < 1:
        raise KvscopeError(f"--kv-mem too small: one KV page needs {bpp} bytes")
    pool = KVPool(cfg.num_layers, slots, ps, cfg.plane_widths(), dtype, device)
    # Tier copies always drain. --unsafe / bypass_drain only let the injected delayed writer
    # skip the drain (runtime/integrity/faults.py), which is the incident's bug 1.
    alloc = PageAllocator(slots, ps)
    tree = RadixTree(ps)
    copier = CopyEngine(cfg.num_layers, device, hooks=copy_hooks)
    specs = plane_specs(pool.planes)
    host = disk = None
    if ec.kv_host_mem is not None or ec.kv_disk is not None:
        nbytes = ec.kv_host_mem if ec.kv_host_mem is not None else 4 * slots * bpp
        n_host = HostPool.slots_for_bytes(specs, cfg.num_layers, ps, nbytes)
        if n_host < 1:
            raise KvscopeError(f"--kv-host-mem too small: one KV page needs {bpp} bytes")
        host = HostPool(specs, cfg.num_layers, n_host, ps, pin=device.type == "cuda")
    if ec.kv_disk is not None:
        try:
            disk = DiskStore(
                ec.kv_disk,
                ec.kv_disk_size,
                model_fingerprint(model_dir, dtype, ps),
                ps,
                (0, cfg.num_layers),
                specs,
            )
        except OSError as e:
            raise KvscopeError(f"--kv-disk {ec.kv_disk}: cannot use ({e.strerror})") from None
    tiers = TierController(
        alloc,
        tree,
        copier,
        pool.planes,
        host=host,
        disk=disk,
        policy=ec.write_policy,
        verify_loads=not ec.unsafe,
    )
    sched = Scheduler(
        tiers, max_batch_tokens=ec.max_batch_tokens, max_running=ec.max_running, preempt=ec.preempt
    )

    def wait_fences(layer: int, plane: str, rows: torch.Tensor) -> None:
        if tiers.loads_in_flight():  # cheap check first: no load, nothing to wait for
            slots = torch.unique(rows // ps).tolist()
            tiers.wait_layer(slots, layer)

    if not ec.unsafe:
        pool.read_guard = wait_fences
    return KVStack(pool, alloc, tree, copier, host, disk, tiers, sched)


def describe(stack: KVStack) -> dict[str, str]:
    out = {"kv_pages_L1": str(stack.pool.num_slots), "write_policy": stack.tiers.policy.value}
    if stack.host is not None:
        out["kv_pages_L2"] = str(stack.host.num_slots)
    if stack.disk is not None:
        out["kv_disk"] = json.dumps(str(stack.disk.root))
    return out
