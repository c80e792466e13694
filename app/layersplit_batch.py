"""`kvscope batch --layer-split N` (N > 1): the batch's prompts through runtime.layersplit.

Greedy only (temperature 0), no HiCache tiers (L1 only, per rank), no integrity checks in this
mode; each output record says so under "layer_split". Prompts run one after another; each rank
stores KV only for the layers it owns (docs/layersplit.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import KvscopeError

NOTE = "LayerSplit batch: greedy, L1 only (no HiCache tiers), no integrity checks"


def run_layer_split_batch(args) -> int:
    import torch

    from runtime.config import load_config
    from runtime.layersplit import run_layer_split
    from runtime.prompts import encode_prompt, eos_ids
    from runtime.tokenizer import Tokenizer

    n = args.layer_split
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise KvscopeError(f"--model {args.model}: not a directory")
    if args.temperature != 0:
        raise KvscopeError("--layer-split: greedy only; use --temperature 0")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.device_count() >= n else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    cfg = load_config(model_dir)
    tok = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    records, errors = [], {}
    for lineno, line in enumerate(Path(args.input).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        uid = f"line-{lineno}"
        try:
            rec = json.loads(line)
            uid = rec.get("id", uid)
            if rec.get("temperature", 0) != 0:
                raise KvscopeError("--layer-split: greedy only ('temperature' must be 0)")
            ids = encode_prompt(
                cfg, model_dir, tok, rec.get("prompt"), rec.get("messages"), rec.get("prompt_ids")
            )
            limit = int(rec.get("max_new_tokens", args.max_new_tokens))
            records.append((uid, ids, limit))
        except json.JSONDecodeError as e:
            msg = f"malformed JSON ({e.msg})"
            errors[len(records) + len(errors)] = {
                "id": uid,
                "error": f"{args.input}:{lineno}: {msg}",
            }
        except (KvscopeError, AttributeError) as e:
            errors[len(records) + len(errors)] = {"id": uid, "error": f"{args.input}:{lineno}: {e}"}
    eos = eos_ids(cfg, model_dir, tok)
    res = None
    if records:
        res = run_layer_split(
            model_dir,
            n,
            [ids for _, ids, _ in records],
            max(lim for _, _, lim in records),
            page_size=args.page_size,
            dtype=dtype,
            device=device,
            eos_ids=eos,
        )
    split = {"ranks": n, "layer_owners": [list(o) for o in res.layer_owners] if res else []}
    split["note"] = NOTE
    with Path(args.output).open("w", encoding="utf-8") as dst:
        it = iter(range(len(records)))
        for i in range(len(records) + len(errors)):
            if i in errors:
                out = errors[i]
            else:
                j = next(it)
                uid, ids, limit = records[j]
                toks = res.tokens[j][:limit]
                reason = "stop" if toks and toks[-1] in eos else "length"
                out = {
                    "id": uid,
                    "text": tok.decode([t for t in toks if t not in eos]) if tok else "",
                    "token_ids": toks,
                    "finish_reason": reason,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": len(toks)},
                    "layer_split": split,
                }
            dst.write(json.dumps(out, ensure_ascii=False) + "\n")
    if not args.quiet:
        print(f"kvscope: {NOTE}; {n} ranks, owners {split['layer_owners']}")
    return 0
