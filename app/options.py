"""Common command-line options and their translation into an EngineConfig."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from runtime.engine import EngineConfig
from runtime.errors import KvscopeError
from runtime.integrity.config import IntegrityConfig, parse_inject

DEMO_MODEL = Path(__file__).resolve().parents[1] / "assets" / "demo"
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1})


def parse_size(text: str, flag: str = "SIZE") -> int:
    """'1048576', '512M', '2GiB', '1.5G' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    unit = unit[:-1] if unit.endswith("B") and unit not in ("B",) and unit[:-1] in _UNITS else unit
    if not m or unit not in _UNITS:
        raise KvscopeError(f"{flag} {text!r}: not a size; use bytes or K/M/G (KiB/MiB/GiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", default=str(DEMO_MODEL), help="checkpoint directory (HF layout)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--quant", default="none", choices=["none", "nf4", "int8", "int4"])
    g.add_argument("--page-size", type=int, default=64, help="tokens per KV page")
    g.add_argument("--gpu-mem", help="SIZE of GPU memory for weights")
    g.add_argument("--cpu-mem", help="SIZE of host memory for weights")
    g.add_argument("--kv-mem", help="SIZE of the L1 KV page pool")
    g.add_argument("--kv-host-mem", help="SIZE of the L2 host KV pool")
    g.add_argument("--kv-disk", help="directory of the L3 disk KV store")
    g.add_argument("--kv-disk-size", help="SIZE budget of the L3 disk store")
    g.add_argument(
        "--write-policy",
        default="write_through",
        choices=["write_through", "write_through_selective", "write_back"],
    )
    g.add_argument(
        "--expert-cache",
        help="offload routed experts behind a cache of N experts, P%% of them, or SIZE bytes",
    )
    g.add_argument("--layer-split", type=int, default=1, help="ranks for LayerSplit")
    g.add_argument("--inject", action="append", default=[], help="fault KIND[:RATE]")
    g.add_argument("--unsafe", action="store_true", help="turn KV protections off (demo only)")
    g.add_argument("--max-running", type=int, default=16, help="requests decoded together")
    g.add_argument(
        "--cpu-graph",
        default="auto",
        choices=["auto", "off"],
        help="CPU decode steps through compiled graphs (auto: compiled in the background)",
    )
    g.add_argument("--timeout", type=float, help="per-request timeout in seconds")
    add_speculative(p)
    g.add_argument(
        "--verbose",
        action="store_true",
        help="print the tracebacks of background failures (CPU-graph compiles) on stderr",
    )


def add_speculative(p: argparse.ArgumentParser) -> None:
    """--speculative and the acceptance detector's thresholds (runtime/integrity/acceptance.py).
    Values are parsed by speculative_options (one-line errors), not by argparse types, so that
    every mode reports them the same way."""
    d = IntegrityConfig()
    g = p.add_argument_group("speculative decoding (the checkpoint's MTP layers)")
    g.add_argument(
        "--speculative",
        default="auto",
        metavar="N|auto|off",
        help="draft tokens per step from the MTP layer; auto: on when the checkpoint has MTP "
        "layers (default); off (or 0): no drafts",
    )
    thresholds = (  # flag, default, metavar, what it sets
        ("--accept-min-length", d.accept_min_length, "X", "flag accept length below X"),
        ("--accept-max-rate", d.accept_max_rate, "R", "flag accept rate above R in [0, 1]"),
        ("--accept-after", d.accept_after_tokens, "N", "judge a request once it made N tokens"),
        ("--accept-window", d.accept_window, "N", "judge the last N verify steps"),
    )
    for flag, default, metavar, what in thresholds:
        g.add_argument(
            flag,
            default=str(default),
            metavar=metavar,
            help=f"acceptance detector: {what} (default {default})",
        )


def parse_speculative(text: str, flag: str = "--speculative") -> int | None:
    """'auto' -> None (on with MTP layers), 'off' / '0' -> 0, 'N' -> N draft tokens."""
    t = str(text).strip().lower()
    if t == "auto":
        return None
    if t in ("off", "0"):
        return 0
    try:
        n = int(t)
    except ValueError:
        n = -1
    if n < 1:
        raise KvscopeError(f"{flag} {text!r}: use a number of draft tokens >= 1, auto or off")
    return n


def _number(args, attr: str, flag: str, kind, lo, hi=None):
    text = getattr(args, attr)
    try:
        v = kind(text)
    except (TypeError, ValueError):
        v = None
    if v is None or v != v or v < lo or (hi is not None and v > hi):
        want = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        noun = "an integer" if kind is int else "a number"
        raise KvscopeError(f"{flag} {text!r}: must be {noun} {want}")
    return v


def speculative_options(args: argparse.Namespace) -> dict:
    """The --speculative / --accept-* flags as {"speculative": ..., "accept": {IntegrityConfig
    fields}}; one-line KvscopeError for a bad value. Namespaces without the flags (modes that
    do not add them) get the defaults."""
    if not hasattr(args, "speculative"):
        return {"speculative": None, "accept": {}}
    accept = dict(
        accept_min_length=_number(args, "accept_min_length", "--accept-min-length", float, 0.0),
        accept_max_rate=_number(args, "accept_max_rate", "--accept-max-rate", float, 0.0, 1.0),
        accept_after_tokens=_number(args, "accept_after", "--accept-after", int, 0),
        accept_window=_number(args, "accept_window", "--accept-window", int, 1),
    )
    return {"speculative": parse_speculative(args.speculative), "accept": accept}


def speculative_flag_given(args: argparse.Namespace) -> str | None:
    """The first --speculative / --accept-* flag set to other than its default, or None (for
    modes that build their engines with the defaults)."""
    defaults = argparse.ArgumentParser()
    add_speculative(defaults)
    for action in defaults._actions:
        if action.dest != "help" and getattr(args, action.dest, action.default) != action.default:
            return action.option_strings[0]
    return None


def kv_tier_options(args: argparse.Namespace) -> dict:
    """--kv-host-mem / --kv-disk / --kv-disk-size / --write-policy as EngineConfig fields."""
    return dict(
        kv_host_mem=parse_size(args.kv_host_mem, "--kv-host-mem") if args.kv_host_mem else None,
        kv_disk=args.kv_disk,
        kv_disk_size=parse_size(args.kv_disk_size, "--kv-disk-size")
        if args.kv_disk_size
        else 4 << 30,
        write_policy=args.write_policy,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    if args.page_size < 1:
        raise KvscopeError(f"--page-size {args.page_size}: must be >= 1")
    if args.max_running < 1:
        raise KvscopeError(f"--max-running {args.max_running}: must be >= 1")
    unsupported = {
        "--layer-split": args.layer_split != 1,
    }
    for flag, used in unsupported.items():
        if used:
            raise KvscopeError(f"{flag}: supported by `kvscope batch` only (docs/layersplit.md)")
    if not Path(args.model).is_dir():
        raise KvscopeError(f"--model {args.model}: not a directory")
    if args.expert_cache is not None:
        from runtime.weights.placement import parse_expert_cache

        parse_expert_cache(args.expert_cache)  # N experts, P% or SIZE; raises a one-line error
    spec = speculative_options(args)
    return EngineConfig(
        device=args.device,
        dtype=args.dtype,
        page_size=args.page_size,
        kv_mem=parse_size(args.kv_mem, "--kv-mem") if args.kv_mem else None,
        max_running=args.max_running,
        timeout_s=args.timeout,
        quant=args.quant,
        gpu_mem=parse_size(args.gpu_mem, "--gpu-mem") if args.gpu_mem else None,
        cpu_mem=parse_size(args.cpu_mem, "--cpu-mem") if args.cpu_mem else None,
        expert_cache=args.expert_cache,
        **kv_tier_options(args),
        unsafe=args.unsafe,
        cpu_graph=getattr(args, "cpu_graph", "auto"),
        speculative=spec["speculative"],
        integrity=IntegrityConfig(
            faults=parse_inject(args.inject),
            bypass_drain=getattr(args, "bypass_drain", False),
            **spec["accept"],
        ),
    )
