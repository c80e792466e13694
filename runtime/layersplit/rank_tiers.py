"""One rank's KV tiers under LayerSplit, built from the HiCache pieces in runtime/kv/ as is:
L1 page pool over the rank's owned layers (`RankKV`), page allocator (owners, epochs,
DRAINING), radix prefix tree, L2 host pool and optional L3 disk store over the same layers,
copy engine (per-layer fences, local layer index) and tier controller, wired by the one
tier-stack builder runtime/kv/tier_stack.py (the engine's too).

Every tier of rank r holds only layers owners[r]. Budgets are per rank (`host_bytes`,
`disk_bytes`); a rank's page is smaller than a single-rank page (owned layers only), so the same
budget buys more pages on a rank owning fewer layers.

L3: each rank has its own directory `DIR/layersplit-N/rank{r}` (file names are prefix hashes,
identical across ranks, so ranks cannot share one). The file header's layer range is the rank's
owned block and its fingerprint is the model's (config, weights, dtype, page size) combined with
the whole split layout, so a file from another rank or another split is a miss (the disk store
deletes it), never served; a damaged or truncated file is a miss as well (checksums).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.kv.tier_stack import DiskSpec, build_tier_stack, model_fingerprint
from runtime.layersplit.ownership import RankKV, contiguous_range
from runtime.model_config import ModelConfig

TIERS = ("L1", "L2", "L3")


@dataclass(frozen=True)
class TierConfig:
    num_slots: int  # L1 page slots per rank
    page_size: int
    host_bytes: int | None = None  # L2 budget per rank; None: no L2 (4x L1 when a disk is set)
    disk_dir: str | None = None  # L3 root directory (one subdirectory per split and rank)
    disk_bytes: int = 1 << 30  # L3 budget per rank
    write_policy: str = "write_through"


def split_fingerprint(model_fp: str, owners) -> str:
    """The model's KV fingerprint combined with the split layout (every rank's layers)."""
    layout = ";".join(",".join(map(str, o)) for o in owners)
    return hashlib.sha256(f"{model_fp}|layersplit {len(owners)}: {layout}".encode()).hexdigest()[
        :32
    ]


def rank_disk_dir(root, world: int, rank: int) -> Path:
    return Path(root) / f"layersplit-{world}" / f"rank{rank}"


class RankTiers:
    """L1/L2/L3 of one rank, wired by the engine's tier-stack builder (runtime/kv/tier_stack.py)."""

    def __init__(
        self,
        cfg: ModelConfig,
        model_dir,
        owners,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        tc: TierConfig,
    ) -> None:
        layers = tuple(owners[rank])
        ps = tc.page_size
        self.rank, self.world, self.layers, self.page_size = rank, len(owners), layers, ps
        self.kv = RankKV(cfg, layers, tc.num_slots, ps, dtype, device)
        disk = None
        if layers and tc.disk_dir is not None:
            fp = split_fingerprint(model_fingerprint(Path(model_dir), dtype, ps), owners)
            where = rank_disk_dir(tc.disk_dir, self.world, rank)
            disk = DiskSpec(where, tc.disk_bytes, fp, contiguous_range(layers))
        t = build_tier_stack(  # the engine's builder; fences per local layer (RankKV's index)
            self.kv.pool,
            device,
            host_bytes=tc.host_bytes if layers else None,
            disk=disk,
            policy=tc.write_policy,
            host_flag=f"L2 budget of rank {rank}",
        )
        self.alloc, self.tree, self.copier = t.alloc, t.tree, t.copier
        self.host, self.disk, self.tiers = t.host, t.disk, t.tiers
        self._stack = t

    # ---- telemetry -----------------------------------------------------------------------------
    def kv_pages(self) -> dict[str, int]:
        """Pages each tier holds room for (L1, L2 slots) or holds (L3 files)."""
        return {
            "L1": self.alloc.num_slots,
            "L2": self.host.num_slots if self.host else 0,
            "L3": self.disk.num_pages if self.disk else 0,
        }

    def kv_bytes(self) -> dict[str, int]:
        """KV bytes by tier: the L1 and L2 pools as allocated, the L3 files' plane bytes
        (headers excluded). All of it for this rank's owned layers only."""
        return {
            "L1": self.kv.total_bytes,
            "L2": self.host.bytes_total if self.host else 0,
            "L3": self.disk.num_pages * self.disk.page_bytes if self.disk else 0,
        }

    def kv_bytes_used(self) -> dict[str, int]:
        used_l1 = (self.alloc.num_slots - self.alloc.num_free) * self.kv.bytes_per_page
        return {
            "L1": used_l1,
            "L2": self.host.bytes_used if self.host else 0,
            "L3": self.disk.num_pages * self.disk.page_bytes if self.disk else 0,
        }

    def close(self) -> None:
        """Finish every transfer (L2 backups, L3 writes) and stop the copy workers."""
        self._stack.close()
