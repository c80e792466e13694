"""`kvscope` command line: chat | inspect | serve | batch | bench | chaos | make-tiny, and the
developer modes gpu-check | quant-eval | expert-bench.

Exit codes: 0 ok, 2 bad input or usage (one clear line on stderr), 3 integrity violation under
--strict, 130 / 143 stopped by SIGINT / SIGTERM (app/shutdown.py). No traceback reaches the user
for input errors. Every mode ends through app/shutdown.finish (no thread left in native code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app import shutdown
from app.cache_defaults import add_default_switches, apply_cache_defaults
from app.options import (
    add_common,
    engine_config,
    speculative_options,
)
from runtime.errors import KvscopeError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"kvscope: error: {message} (see kvscope {self.prog.split()[-1]} -h)\n")
        raise SystemExit(2)


def _non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvscope", description="Local MoE inference with a verified, tiered KV cache")
    sub = p.add_subparsers(dest="mode", required=True, parser_class=_Parser)
    for mode, text in (("chat", "TUI chat"), ("inspect", "TUI on the cache inspector")):
        m = sub.add_parser(mode, help=text)
        add_common(m)
        m.add_argument("--max-new-tokens", type=int, default=256)
        m.add_argument("--temperature", type=float, default=0.0)
        m.add_argument("--seed", type=int)
        add_default_switches(m)
        if mode == "inspect":
            m.add_argument("--attach", metavar="URL", help="inspect a running `kvscope serve`")
            m.add_argument("--api-key", help="the server's key (with --attach)")
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_common(s)
    add_default_switches(s)
    from app.serve.cli import add_serve_args

    add_serve_args(s)
    b = sub.add_parser("batch", help="JSONL in, JSONL out")
    add_common(b)
    b.add_argument("--input", required=True, help="input JSONL, one request per line")
    b.add_argument("--output", required=True, help="output JSONL, one record per input line")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--seed", type=int)
    b.add_argument("--strict", action="store_true", help="exit 3 if any corruption was found")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument(
        "--resume",
        action="store_true",
        help="keep the complete lines of an existing --output and run only the missing ids",
    )
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
        "--mtp",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="also write N MTP (nextn) layers in the published layout (default 0)",
    )
    t.add_argument(
        "--preset",
        choices=["cpu-mini"],
        help="benchmark size: bf16, 32k BPE tokenizer (docs/performance.md); default: tiny",
    )
    from app.expert_bench import add_expert_bench_args
    from app.gpu_check import add_gpu_check_args
    from app.quant_eval import add_quant_eval_args

    add_gpu_check_args(sub.add_parser("gpu-check", help="check and time the GPU paths (dev)"))
    add_quant_eval_args(sub.add_parser("quant-eval", help="KL / top-1 of quantized weights (dev)"))
    add_expert_bench_args(sub.add_parser("expert-bench", help="offloaded-expert decode (dev, GPU)"))
    return p


def _make_engine(args):
    from runtime.engine import Engine

    return shutdown.track(Engine(args.model, engine_config(args)))


def cmd_batch(args) -> int:
    from app.batch import count_requests, run_batch
    from app.batch_progress import BatchProgress

    if args.max_new_tokens < 1:
        raise KvscopeError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if not Path(args.input).is_file():
        raise KvscopeError(f"--input {args.input}: file not found")
    if args.layer_split > 1:  # greedy, per-rank tiers: app/layersplit_batch.py
        from app.layersplit_batch import run_layer_split_batch

        if args.resume:  # it writes every line at the end, in input order
            raise KvscopeError("--resume: not supported with --layer-split")
        if speculative_options(args)["speculative"]:
            raise KvscopeError("--speculative: not supported with --layer-split (use auto or off)")
        with shutdown.Stop():  # a signal raises shutdown.Interrupted: exit 130 / 143
            return run_layer_split_batch(args)
    engine = _make_engine(args)
    defaults = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    inp, out = Path(args.input), Path(args.output)
    with shutdown.Stop(cooperative=True) as stop:  # the batch loop polls stop.requested
        if args.quiet:
            summary = run_batch(engine, inp, out, defaults, stop=stop, resume=args.resume)
        else:
            with BatchProgress(total_requests=count_requests(inp)) as progress:
                summary = run_batch(
                    engine, inp, out, defaults, progress, stop=stop, resume=args.resume
                )
        engine.close()
    if stop.status is not None:
        sys.stderr.write(
            f"kvscope batch: stopped by a signal; {summary['requests']} lines written to "
            f"{out}; the rest runs with --resume\n"
        )
        return stop.status
    return 3 if args.strict and summary["corrupt"] else 0


def cmd_tui(args) -> int:
    from inspector.app import KvscopeApp

    if getattr(args, "attach", None):
        return cmd_attach(args)
    apply_cache_defaults(args)
    engine = _make_engine(args)
    app = KvscopeApp(
        engine,
        args.mode,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    # Textual reads Ctrl+C / Ctrl+Q as keys; SIGTERM (and SIGINT from outside) quit the app.
    with shutdown.Stop(on_stop=lambda status: app.exit(return_code=status)) as stop:
        app.run()
    engine.close()
    return stop.status if stop.status is not None else 0


def cmd_attach(args) -> int:
    from inspector.app import run_app
    from inspector.remote import AttachError, RemoteEngine

    try:
        engine = RemoteEngine(args.attach, args.api_key)
    except AttachError as e:
        raise KvscopeError(str(e)) from None
    try:
        run_app(engine, screen="inspect")
    finally:
        engine.close()
    return 0


def cmd_serve(args) -> int:
    from app.serve.cli import cmd_serve as run

    return run(args)


def cmd_chaos(args) -> int:
    from app.chaos import cmd_chaos as run

    engine_config(args)  # validates the common flags with one-line errors
    return run(args)


def cmd_make_tiny(args) -> int:
    if args.preset:
        from runtime.weights.presets import write_preset

        write_preset(args.out, args.preset, args.arch, seed=args.seed, mtp=args.mtp)
        print(f"wrote {args.preset} {args.arch} checkpoint to {args.out}")
        return 0
    from runtime.weights.tiny import write_tiny

    out = write_tiny(args.out, args.arch, seed=args.seed, mtp=args.mtp)
    mtp = f" with {args.mtp} MTP layer(s)" if args.mtp else ""
    print(f"wrote {args.arch} checkpoint{mtp} to {out}")
    return 0


def cmd_bench(args, argv: list[str] | None = None) -> int:
    from app.bench import cmd_bench as run

    return run(args, argv)


def _dev_mode(module: str, args, argv: list[str] | None = None) -> int:
    """Developer tools (app/gpu_check.py, app/quant_eval.py, app/expert_bench.py)."""
    import importlib

    mod = importlib.import_module(f"app.{module}")
    if module == "gpu_check":
        return mod.cmd_gpu_check(args, (argv if argv is not None else sys.argv[1:])[1:])
    return getattr(mod, f"cmd_{module}")(args)


def run(argv: list[str] | None = None) -> int:
    """Parse and run one mode; returns its exit status (background work still running)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors (exit 2) and -h (exit 0)
        return int(e.code or 0)
    if getattr(args, "verbose", False):
        import os

        os.environ["KVSCOPE_VERBOSE"] = "1"  # read by runtime.models.cpu_graph at import
    handlers = {"batch": cmd_batch, "chat": cmd_tui, "inspect": cmd_tui}
    handlers["make-tiny"] = cmd_make_tiny
    handlers["chaos"] = cmd_chaos
    handlers["serve"] = cmd_serve
    handlers["bench"] = lambda a: cmd_bench(a, argv)
    handlers["gpu-check"] = lambda a: _dev_mode("gpu_check", a, argv)
    handlers["quant-eval"] = lambda a: _dev_mode("quant_eval", a)
    handlers["expert-bench"] = lambda a: _dev_mode("expert_bench", a)
    try:
        if args.mode in ("bench", "chaos", "make-tiny"):  # no stop-polling loop: raise
            with shutdown.Stop():
                return handlers[args.mode](args)
        return handlers[args.mode](args)
    except KvscopeError as e:
        sys.stderr.write(f"kvscope: error: {e}\n")
        return e.exit_code
    except shutdown.Interrupted as e:
        sys.stderr.write(f"kvscope: {args.mode} stopped by a signal\n")
        return e.status
    except KeyboardInterrupt:
        return shutdown.EXIT_SIGINT


def main(argv: list[str] | None = None) -> int:
    """Run one mode and close the engines it made; returns the exit status. In-process callers
    (tests) use this; the process entry point is ``entry``."""
    try:
        return run(argv)
    finally:
        shutdown.close_tracked()


def entry(argv: list[str] | None = None) -> None:
    """The `kvscope` console script: main, then the process ends through shutdown.finish (no
    compile or copy thread left inside native code when the interpreter finalizes)."""
    status = 1
    try:
        status = main(argv)
    finally:
        status = shutdown.finish(status)
    raise SystemExit(status)


if __name__ == "__main__":
    entry()
