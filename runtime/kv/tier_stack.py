"""Wires the KV tiers over one L1 pool: page allocator, radix tree, copy engine, L2 host pool,
L3 disk store and tier controller. The one tier-stack builder: the engine
(runtime/cache_stack.py, which adds the scheduler) and every LayerSplit rank
(runtime/layersplit/rank_tiers.py, over the rank's owned layers) build their tiers here.

The L1 pool's accessors wait on load fences inside `KVPool.gather` through `read_guard`
(invariant 2): a reader cannot skip the wait by forgetting to call it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import KvscopeError
from runtime.kv.allocator import PageAllocator
from runtime.kv.copy_engine import CopyEngine, CopyHooks
from runtime.kv.disk_store import DiskStore
from runtime.kv.host_pool import HostPool, plane_specs
from runtime.kv.pool import KVPool
from runtime.kv.radix import RadixTree
from runtime.kv.tier_controller import TierController


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


@dataclass(frozen=True)
class DiskSpec:
    """Where and how big the L3 store is, and what its files must match."""

    root: str | Path
    nbytes: int
    fingerprint: str  # model (and split layout) the pages were computed with
    layers: tuple[int, int]  # [first, end) global layer range the files hold


@dataclass
class TierStack:
    pool: KVPool
    alloc: PageAllocator
    tree: RadixTree
    copier: CopyEngine
    host: HostPool | None
    disk: DiskStore | None
    tiers: TierController

    def close(self) -> None:
        """Finish every transfer (L2 backups, L3 writes) and stop the copy workers."""
        self.tiers.drain()
        self.copier.close()


def build_tier_stack(
    pool: KVPool,
    device: torch.device,
    *,
    host_bytes: int | None = None,
    disk: DiskSpec | None = None,
    policy: str = "write_through",
    verify_loads: bool = True,
    fence_guard: bool = True,
    copy_hooks: CopyHooks | None = None,
    host_flag: str = "--kv-host-mem",
) -> TierStack:
    """The tiers over `pool`. L2 exists when `host_bytes` or `disk` is given (default budget
    4x L1 when only a disk is); `host_flag` names the budget in the too-small error.
    `fence_guard` installs the read guard that waits on load fences (invariant 2)."""
    ps, n_layers, slots = pool.page_size, pool.num_layers, pool.num_slots
    bpp = pool.bytes_per_page
    # Tier copies always drain. --unsafe / bypass_drain only let the injected delayed writer
    # skip the drain (runtime/integrity/faults.py), which is the incident's bug 1.
    alloc = PageAllocator(slots, ps)
    tree = RadixTree(ps)
    # fences are per pool layer (a LayerSplit rank's local layer index)
    copier = CopyEngine(max(n_layers, 1), device, hooks=copy_hooks)
    specs = plane_specs(pool.planes)
    host = store = None
    if host_bytes is not None or disk is not None:
        nbytes = host_bytes if host_bytes is not None else 4 * slots * bpp
        n_host = HostPool.slots_for_bytes(specs, n_layers, ps, nbytes)
        if n_host < 1:
            raise KvscopeError(f"{host_flag} too small: one KV page needs {bpp} bytes")
        host = HostPool(specs, n_layers, n_host, ps, pin=device.type == "cuda")
    if disk is not None:
        try:
            store = DiskStore(disk.root, disk.nbytes, disk.fingerprint, ps, disk.layers, specs)
        except OSError as e:
            raise KvscopeError(f"--kv-disk {disk.root}: cannot use ({e.strerror})") from None
    tiers = TierController(
        alloc,
        tree,
        copier,
        pool.planes,
        host=host,
        disk=store,
        policy=policy,
        verify_loads=verify_loads,
    )

    def wait_fences(layer: int, plane: str, rows: torch.Tensor) -> None:
        if tiers.loads_in_flight():  # cheap check first: no load, nothing to wait for
            tiers.wait_layer(torch.unique(rows // ps).tolist(), layer)

    if fence_guard:
        pool.read_guard = wait_fences
    return TierStack(pool, alloc, tree, copier, host, store, tiers)
