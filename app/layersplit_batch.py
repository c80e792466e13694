"""`kvscope batch --layer-split N` (N > 1): the batch's prompts through runtime.layersplit.

The valid requests are submitted together: up to `--max-running` decode at once (the others
wait and are admitted as sequences finish). Each rank keeps the KV of the layers it owns in its
own tiers: L1 (`--kv-mem` per rank, default: room for the largest running set), L2
(`--kv-host-mem` per rank), L3 (`--kv-disk`, one subdirectory per split and rank,
`--kv-disk-size` per rank); prefixes are reused across requests and across runs with the same
split. `--timeout` ends a request (finish_reason "timeout", its pages drained across ranks).
Greedy only (temperature 0); page epochs and tier checksums are checked, but there are no
per-token integrity verdicts or shadow checks in this mode. Every input line yields one output
line, in input order, once the run ends: a result with a "layer_split" object (owners, the
request's cached tokens per rank, per-rank telemetry) or {"id", "error"}.
"""

from __future__ import annotations

from pathlib import Path

from app.jsonl import json_line
from runtime.errors import KvscopeError

NOTE = (
    "LayerSplit batch: greedy; per-rank L1/L2/L3 tiers with page epochs and checksums; "
    "no per-token integrity verdicts"
)


def _unsupported(args) -> None:
    for flag, used in (
        ("--quant", getattr(args, "quant", "none") != "none"),
        ("--expert-cache", getattr(args, "expert_cache", None) is not None),
        ("--inject", bool(getattr(args, "inject", None))),
        ("--unsafe", bool(getattr(args, "unsafe", False))),
    ):
        if used:
            raise KvscopeError(f"--layer-split: {flag} is not supported in this mode")


def _num_slots(args, model_dir, n: int, dtype: str) -> int | None:
    """--kv-mem (per rank) -> L1 pages, sized by the rank with the largest page."""
    if not args.kv_mem:
        return None
    import torch

    from app.options import parse_size
    from runtime.layersplit.ownership import RankKV
    from runtime.layersplit.rank import DTYPES, plan_owners
    from runtime.model_config import load_config

    cfg, dt = load_config(model_dir), DTYPES[dtype]
    biggest = max(
        RankKV(cfg, o, 1, args.page_size, dt, torch.device("meta")).bytes_per_page
        for o in plan_owners(model_dir, n, dt)
    )
    slots = parse_size(args.kv_mem, "--kv-mem") // max(biggest, 1)
    if slots < 1:
        raise KvscopeError(f"--kv-mem too small: one KV page of a rank needs {biggest} bytes")
    return slots


def _read(args, cfg, model_dir, tok) -> tuple[list, dict]:
    """Valid requests (line index, id, prompt ids, max new) and error records by line index."""
    from app.jsonl import read_requests
    from runtime.prompts import encode_prompt

    records, errors = [], {}
    for line in read_requests(args.input):
        if line.error is not None:
            errors[line.index] = {"id": line.uid, "error": line.error}
            continue
        rec = line.rec
        try:
            if rec.get("temperature", 0) != 0:
                raise KvscopeError("--layer-split: greedy only ('temperature' must be 0)")
            limit = rec.get("max_new_tokens", args.max_new_tokens)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise KvscopeError("'max_new_tokens' must be an integer >= 1")
            ids = encode_prompt(
                cfg, model_dir, tok, rec.get("prompt"), rec.get("messages"), rec.get("prompt_ids")
            )
            records.append((line.index, line.uid, ids, limit))
        except (KvscopeError, AttributeError) as e:
            errors[line.index] = {"id": line.uid, "error": f"{args.input}:{line.lineno}: {e}"}
    return records, errors


def _drop_unfit(records: list, errors: dict, num_slots: int, page_size: int) -> None:
    """A request that can never fit the L1 pool becomes an error record, not a failed run."""
    for rec in list(records):
        index, uid, ids, limit = rec
        need = -(-(len(ids) + limit) // page_size)
        if need > num_slots:
            records.remove(rec)
            errors[index] = {
                "id": uid,
                "error": f"needs {need} KV pages; --kv-mem holds {num_slots} per rank",
            }


def _result(uid, ids, res, j: int, tok, eos, split: dict, telemetry: list) -> dict:
    toks, cached = res.tokens[j], res.cached[j]
    return {
        "id": uid,
        "text": tok.decode([t for t in toks if t not in eos]) if tok else "",
        "token_ids": toks,
        "finish_reason": res.finish_reasons[j],
        "usage": {
            "prompt_tokens": len(ids),
            "completion_tokens": len(toks),
            "cached_tokens": dict(cached["by_tier"]),  # slowest tier any rank served
        },
        "layer_split": {
            **split,
            "cached_tokens_by_rank": cached["by_rank"],
            "telemetry": telemetry,  # per rank, for the whole run
        },
    }


def run_layer_split_batch(args) -> int:
    import torch

    from app.options import kv_tier_options
    from runtime.layersplit import run_layer_split
    from runtime.model_config import load_config
    from runtime.prompts import eos_ids
    from runtime.tokenizer import Tokenizer

    n = args.layer_split
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise KvscopeError(f"--model {args.model}: not a directory")
    if args.temperature != 0:
        raise KvscopeError("--layer-split: greedy only; use --temperature 0")
    _unsupported(args)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.device_count() >= n else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    cfg = load_config(model_dir)
    tok = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    records, errors = _read(args, cfg, model_dir, tok)
    eos = eos_ids(cfg, model_dir, tok)
    num_slots = _num_slots(args, model_dir, n, dtype)
    if num_slots is not None:
        _drop_unfit(records, errors, num_slots, args.page_size)
    tiers = kv_tier_options(args)  # per rank, for its own layers
    res = None
    if records:
        res = run_layer_split(
            model_dir,
            n,
            [ids for _, _, ids, _ in records],
            [lim for *_, lim in records],
            page_size=args.page_size,
            dtype=dtype,
            device=device,
            eos_ids=eos,
            max_batch=args.max_running,
            num_slots=num_slots,
            host_bytes=tiers["kv_host_mem"],
            disk_dir=tiers["kv_disk"],
            disk_bytes=tiers["kv_disk_size"],
            write_policy=tiers["write_policy"],
            timeout_s=args.timeout,
        )
    owners = [list(o) for o in res.layer_owners] if res else []
    telemetry = [t.as_dict() for t in res.telemetry] if res else []
    out_records = dict(errors)
    for j, (index, uid, ids, _) in enumerate(records):
        split = {"ranks": n, "layer_owners": owners, "note": NOTE}
        out_records[index] = _result(uid, ids, res, j, tok, eos, split, telemetry)
    try:
        dst = Path(args.output).open("w", encoding="utf-8")
    except OSError as e:
        raise KvscopeError(f"--output {args.output}: cannot write ({e.strerror})") from None
    with dst:
        for i in sorted(out_records):
            dst.write(json_line(out_records[i]))
    if not args.quiet:
        print(f"kvscope: {NOTE}; {n} ranks, owners {owners}")
    return 0
