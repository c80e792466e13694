"""`kvscope serve`: flags, checks and the uvicorn run (optionally with the TUI in-process)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading
from pathlib import Path

from runtime.errors import KvscopeError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="bind address (non-loopback needs --api-key)"
    )
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API route")
    g.add_argument("--model-name", help="model id clients send (default: the directory name)")
    g.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted")
    g.add_argument("--default-max-tokens", type=int, default=256)
    g.add_argument("--max-body", default="1MiB", help="SIZE limit of a request body")
    g.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        help="admitted requests beyond --max-running (429 past it)",
    )
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--tui", action="store_true", help="run the inspector in this process too")
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve_args(args) -> None:
    """One-line errors (exit 2) for unsafe or impossible settings, before loading a model."""
    if not is_loopback(args.host) and not args.api_key:
        raise KvscopeError(
            f"--host {args.host}: binding beyond loopback needs --api-key KEY (clients send "
            "'Authorization: Bearer KEY')"
        )
    if not 0 <= args.port <= 65535:
        raise KvscopeError(f"--port {args.port}: must be in 0..65535")
    for flag, v in (
        ("--max-tokens-limit", args.max_tokens_limit),
        ("--default-max-tokens", args.default_max_tokens),
    ):
        if v < 1:
            raise KvscopeError(f"{flag} {v}: must be >= 1")
    if args.max_waiting < 0:
        raise KvscopeError(f"--max-waiting {args.max_waiting}: must be >= 0")
    if args.request_timeout <= 0:
        raise KvscopeError(f"--request-timeout {args.request_timeout}: must be > 0")


def check_bind(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound (one line, exit 2)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise KvscopeError(
                f"--host {host} --port {port}: cannot bind ({e.strerror or e}); pick another --port"
            ) from None


def build_server(args):
    """(engine, app, options) for the parsed flags."""
    from app.cache_defaults import apply_cache_defaults
    from app.options import engine_config, parse_size
    from app.serve.protocol import Limits
    from app.serve.server import ServeOptions, create_app
    from runtime.engine import Engine

    check_serve_args(args)
    check_bind(args.host, args.port)
    apply_cache_defaults(args)
    cfg = engine_config(args)
    limits = Limits(
        max_body_bytes=parse_size(args.max_body, "--max-body"),
        max_tokens=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens,
    )
    opts = ServeOptions(
        model_name=args.model_name or Path(args.model).resolve().name,
        api_key=args.api_key,
        limits=limits,
        max_waiting=args.max_waiting,
        request_timeout_s=args.request_timeout,
    )
    engine = Engine(args.model, cfg)
    return engine, create_app(engine, opts), opts


def cmd_serve(args) -> int:
    import uvicorn

    engine, app, opts = build_server(args)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    tiers = f"L2 {args.kv_host_mem or 'off'}, L3 {args.kv_disk or 'off'}"
    sys.stderr.write(
        f"kvscope: serving {opts.model_name} on http://{args.host}:{args.port}/v1 "
        f"(page size {args.page_size}; {tiers})\n"
    )
    if not args.tui:
        server.run()
        return 0
    from app.serve.local_view import LocalView
    from inspector.app import run_app

    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:  # the TUI only once the server listens
        if not thread.is_alive():
            raise KvscopeError(f"--port {args.port}: the server did not start")
        thread.join(0.05)
    try:
        run_app(LocalView(app.state.runner), "inspect")
    finally:
        server.should_exit = True
        thread.join(30)
    return 0
