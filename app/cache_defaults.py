"""Tier defaults that show the product: on the demo model, `chat`, `inspect` and `serve` start
with L2 on and L3 on in the user's cache directory, at a page size the demo's short prompts fill.

    L3 directory: $XDG_CACHE_HOME/kvscope/<model fingerprint>  (XDG_CACHE_HOME defaults to
                  ~/.cache; the fingerprint covers config, weights, dtype and page size, so
                  another model or page size never shares a directory)
    Off switches: --no-kv-host (no L2), --no-kv-disk (no L3); explicit --page-size,
                  --kv-host-mem, --kv-disk win. `--kv-disk auto` picks that directory for any
                  model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from app.options import DEMO_MODEL

DEMO_PAGE_SIZE = 8  # the demo's chat prompts are 7-15 tokens: they fill pages and share them
DEMO_HOST_MEM = "64MiB"
DEMO_DISK_SIZE = "512MiB"
DEFAULT_PAGE_SIZE = 64


def add_default_switches(p: argparse.ArgumentParser) -> None:
    p.set_defaults(page_size=None)  # None: chosen by apply_cache_defaults
    g = p.add_argument_group("cache defaults")
    g.add_argument("--no-kv-host", action="store_true", help="no L2 host tier by default")
    g.add_argument("--no-kv-disk", action="store_true", help="no L3 disk tier by default")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvscope"


def _is_demo(model: str) -> bool:
    try:
        return Path(model).resolve() == DEMO_MODEL.resolve()
    except OSError:
        return False


def disk_dir(model: str, dtype_flag: str, device_flag: str, page_size: int) -> Path:
    """$XDG_CACHE_HOME/kvscope/<fingerprint of the model, dtype and page size>."""
    from runtime.engine_config import EngineConfig
    from runtime.kv.tier_stack import model_fingerprint

    cfg = EngineConfig(device=device_flag, dtype=dtype_flag, page_size=page_size)
    dtype = cfg.resolve_dtype(cfg.resolve_device())
    return cache_dir() / model_fingerprint(Path(model), dtype, page_size)


def apply_cache_defaults(args: argparse.Namespace) -> None:
    """Fill the page size and tier flags the user left unset (in place)."""
    demo = _is_demo(args.model)
    if args.page_size is None:
        args.page_size = DEMO_PAGE_SIZE if demo else DEFAULT_PAGE_SIZE
    if not Path(args.model).is_dir():
        return  # engine_config() reports it
    if args.no_kv_host:
        args.kv_host_mem = None
    elif demo and args.kv_host_mem is None:
        args.kv_host_mem = DEMO_HOST_MEM
    if args.no_kv_disk:
        args.kv_disk = None
    elif args.kv_disk == "auto" or (demo and args.kv_disk is None):
        args.kv_disk = str(disk_dir(args.model, args.dtype, args.device, args.page_size))
        if args.kv_disk_size is None:
            args.kv_disk_size = DEMO_DISK_SIZE
