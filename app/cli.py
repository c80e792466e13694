"""`kvscope` command line: chat | inspect | batch | bench | chaos | make-tiny.

Exit codes: 0 ok, 2 bad input or usage (one clear line on stderr), 3 integrity violation under
--strict. No traceback reaches the user for input errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app.options import add_common, engine_config
from runtime.errors import KvscopeError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"kvscope: error: {message} (see kvscope {self.prog.split()[-1]} -h)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvscope", description="Local MoE inference with a verified, tiered KV cache")
    sub = p.add_subparsers(dest="mode", required=True, parser_class=_Parser)
    for mode, text in (("chat", "TUI chat"), ("inspect", "TUI on the cache inspector")):
        m = sub.add_parser(mode, help=text)
        add_common(m)
        m.add_argument("--max-new-tokens", type=int, default=256)
        m.add_argument("--temperature", type=float, default=0.0)
        m.add_argument("--seed", type=int)
    b = sub.add_parser("batch", help="JSONL in, JSONL out")
    add_common(b)
    b.add_argument("--input", required=True, help="input JSONL, one request per line")
    b.add_argument("--output", required=True, help="output JSONL, one record per input line")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int)
    b.add_argument("--strict", action="store_true", help="exit 3 if any corruption was found")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    from app.bench import add_bench_args

    add_bench_args(sub.add_parser("bench", help="kvscope vs transformers and the physical floors"))
    c = sub.add_parser("chaos", help="fault injection under KV pressure, with a report")
    add_common(c)
    from app.chaos import add_chaos_args

    add_chaos_args(c)
    t = sub.add_parser("make-tiny", help="write a random tiny (or --preset) checkpoint")
    t.add_argument("--arch", required=True, choices=["glm_moe_dsa", "glm4_moe"])
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--preset",
        choices=["cpu-mini"],
        help="benchmark size: bf16, 32k BPE tokenizer (docs/performance.md); default: tiny",
    )
    return p


def _make_engine(args):
    from runtime.engine import Engine

    return Engine(args.model, engine_config(args))


def cmd_batch(args) -> int:
    from app.batch import count_requests, run_batch
    from inspector.batch_progress import BatchProgress

    if args.max_new_tokens < 1:
        raise KvscopeError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not Path(args.input).is_file():
        raise KvscopeError(f"--input {args.input}: file not found")
    if args.layer_split > 1:  # greedy, per-rank tiers: app/layersplit_batch.py
        from app.layersplit_batch import run_layer_split_batch

        return run_layer_split_batch(args)
    engine = _make_engine(args)
    defaults = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    if args.quiet:
        summary = run_batch(engine, Path(args.input), Path(args.output), defaults)
    else:
        with BatchProgress(total_requests=count_requests(Path(args.input))) as progress:
            summary = run_batch(engine, Path(args.input), Path(args.output), defaults, progress)
    return 3 if args.strict and summary["corrupt"] else 0


def cmd_tui(args) -> int:
    from inspector.app import run_app

    engine = _make_engine(args)
    run_app(
        engine,
        screen=args.mode,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    return 0


def cmd_chaos(args) -> int:
    from app.chaos import cmd_chaos as run

    engine_config(args)  # validates the common flags with one-line errors
    return run(args)


def cmd_make_tiny(args) -> int:
    if args.preset:
        from runtime.weights.presets import write_preset

        write_preset(args.out, args.preset, args.arch, seed=args.seed)
        print(f"wrote {args.preset} {args.arch} checkpoint to {args.out}")
        return 0
    from runtime.weights.tiny import write_tiny

    out = write_tiny(args.out, args.arch, seed=args.seed)
    print(f"wrote {args.arch} checkpoint to {out}")
    return 0


def cmd_bench(args, argv: list[str] | None = None) -> int:
    from app.bench import cmd_bench as run

    return run(args, argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (exit 2) and -h (exit 0)
        return int(e.code or 0)
    handlers = {"batch": cmd_batch, "chat": cmd_tui, "inspect": cmd_tui}
    handlers["make-tiny"] = cmd_make_tiny
    handlers["chaos"] = cmd_chaos
    handlers["bench"] = lambda a: cmd_bench(a, argv)
    try:
        return handlers[args.mode](args)
    except KvscopeError as e:
        sys.stderr.write(f"kvscope: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
