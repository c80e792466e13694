"""Try the TUI without a model: `python -m inspector [--inspect] [--seed N] [--inject KIND]`.

Runs the app on the FakeEngine TEST DOUBLE (words from a fixed list, simulated pages), slowed to
a watchable pace. The real entry points are `kvscope chat` and `kvscope inspect`.
"""

from __future__ import annotations

import argparse

from inspector.app import run_app
from inspector.fake_engine import FakeEngine


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m inspector", description=__doc__)
    parser.add_argument("--inspect", action="store_true", help="open on the cache inspector")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inject", default=None, help="fault kind to inject every 10th token")
    parser.add_argument("--l1-pages", type=int, default=48)
    parser.add_argument("--step-delay", type=float, default=0.04, help="seconds per step")
    args = parser.parse_args()
    engine = FakeEngine(
        seed=args.seed, inject=args.inject, l1_pages=args.l1_pages, step_delay_s=args.step_delay
    )
    run_app(engine, "inspect" if args.inspect else "chat")


if __name__ == "__main__":
    main()
