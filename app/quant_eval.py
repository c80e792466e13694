"""Quantization quality: KL divergence and top-1 agreement of a quantized model against full
precision, teacher-forced over the same tokens (next-token distributions at every position).

    kvscope quant-eval --model assets/demo --text assets/demo_heldout.txt --tokens 512 --window 128

KL(p_ref || p_quant) is averaged over positions, in nats; top-1 agreement is the fraction of
positions whose argmax matches. docs/quantization.md holds the table this prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime.engine import Engine, EngineConfig
from runtime.kv.pool import KVPool, token_rows
from runtime.models.batch import ForwardBatch, SeqChunk


def sequence_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """Logits [n, V] (fp32) at every position of ``ids``, one prefill from position 0 in a
    scratch page pool (the engine's own KV pages are never touched)."""
    ps, dev, cfg = engine.config.page_size, engine.device, engine.model_config
    pool = KVPool(cfg.num_layers, -(-len(ids) // ps), ps, cfg.plane_widths(), engine.dtype, dev)
    rows = token_rows(list(range(pool.num_slots)), 0, len(ids), ps).to(dev)
    batch = ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
        positions=torch.arange(len(ids), device=dev),
        new_rows=rows,
        seqs=[SeqChunk(0, len(ids), 0, rows, "quant-eval")],
    )
    return engine.model.forward(batch, pool, all_logits=True).float().cpu()


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Mean KL(ref || test) in nats and top-1 agreement over positions (rows)."""
    lp = torch.log_softmax(ref.double(), -1)
    lq = torch.log_softmax(test.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [n]
    top1 = (ref.argmax(-1) == test.argmax(-1)).double()
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(top1.mean())}


def windows(ids: list[int], window: int, total: int) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids) and sum(map(len, out)) < total:
        out.append(ids[i : i + window])
        i += window
    return [w for w in out if len(w) > 1]


def quant_quality(
    model_dir: str | Path,
    ids: list[int],
    methods: tuple[str, ...] = ("int8", "nf4", "int4"),
    window: int = 128,
    total: int = 512,
    dtype: str = "float32",
    device: str = "cpu",
    peers: str = "none",
    **engine_kw,
) -> dict[str, dict[str, float]]:
    """{method: {kl, kl_max, top1, tokens}} against ``--quant none`` on the same device/dtype;
    with peers "llamacpp" also {"llamacpp": {...}} (app/quant_eval_llamacpp.py)."""
    chunks = windows(ids, window, total)
    base = EngineConfig(device=device, dtype=dtype, page_size=16, max_running=1, **engine_kw)
    ref_engine = Engine(model_dir, base)
    refs = [sequence_logits(ref_engine, c) for c in chunks]
    del ref_engine
    peer = {}
    if peers == "llamacpp":
        from app.quant_eval_llamacpp import llamacpp_quality

        peer = {
            "llamacpp": llamacpp_quality(
                model_dir, chunks, methods, torch.cat(refs), compare_logits
            )
        }
    out = {}
    for m in methods:
        eng = Engine(model_dir, EngineConfig(**{**base.__dict__, "quant": m}))
        tests = [sequence_logits(eng, c) for c in chunks]
        r = compare_logits(torch.cat(refs), torch.cat(tests))
        r["tokens"] = sum(len(c) for c in chunks)
        out[m] = r
    return out | peer


def add_quant_eval_args(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    p.add_argument("--text", help="held-out text file (needs the model's tokenizer)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", default="int8,nf4,int4", help="comma-separated quant methods")
    p.add_argument("--json", metavar="FILE", help="also write the table here")
    p.add_argument(
        "--peers",
        default="none",
        choices=["none", "llamacpp"],
        help="llamacpp: also llama.cpp's Q8_0 / Q4_0 against its own F32 on the same windows "
        "(needs `make llamacpp`; app/quant_eval_llamacpp.py)",
    )


def cmd_quant_eval(args) -> int:
    """`kvscope quant-eval`: prints {method: {kl, kl_max, top1, tokens}} as JSON."""
    from runtime.errors import KvscopeError

    if not Path(args.model).is_dir():
        raise KvscopeError(f"--model {args.model}: not a directory")
    methods = tuple(m for m in args.methods.split(",") if m)
    bad = sorted(set(methods) - {"int8", "nf4", "int4"})
    if bad or not methods:
        raise KvscopeError(f"--methods {args.methods}: choose from int8, nf4, int4")
    if args.tokens < 2 or args.window < 2:
        raise KvscopeError("--tokens and --window must be >= 2")
    if args.text:
        if not Path(args.text).is_file():
            raise KvscopeError(f"--text {args.text}: file not found")
        from runtime.tokenizer import Tokenizer

        ids = Tokenizer(args.model).encode(Path(args.text).read_text())
    else:  # deterministic pseudo-text over the vocabulary
        from runtime.model_config import load_config

        v = load_config(args.model).vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, v, (args.tokens,), generator=g).tolist()
    peers = getattr(args, "peers", "none")
    if peers == "llamacpp":
        from app.bench_llamacpp import locate

        locate()  # a missing build fails before anything is computed
        if args.dtype != "float32":
            raise KvscopeError("--peers llamacpp compares against F32: use --dtype float32")
    res = quant_quality(
        args.model, ids, methods, args.window, args.tokens, args.dtype, args.device, peers=peers
    )
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
