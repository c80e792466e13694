"""`kvscope serve` flags, the demo cache defaults, and `serve --tui`'s in-process view."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from app.cache_defaults import DEMO_PAGE_SIZE, apply_cache_defaults, cache_dir
from app.cli import build_parser, main
from app.serve.local_view import READ_ONLY, LocalView
from app.serve.server import ServeOptions, create_app
from inspector.app import KvscopeApp
from runtime.engine import Engine, EngineConfig
from tests.app.serve_helpers import UvicornThread


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["serve", "--host", "0.0.0.0"], "--api-key"),
        (["serve", "--host", "192.168.1.5", "--port", "1"], "--api-key"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--max-tokens-limit", "0"], "--max-tokens-limit"),
        (["serve", "--model", "/nonexistent/model"], "--model"),
        (["inspect", "--attach", "http://127.0.0.1:9"], "cannot connect"),
    ],
)
def test_bad_serve_flags_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_busy_port_is_a_one_line_error(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot bind" in err


def test_demo_defaults_l2_l3_in_the_xdg_cache(tmp_path):
    args = build_parser().parse_args(["serve"])
    apply_cache_defaults(args)
    assert args.page_size == DEMO_PAGE_SIZE and args.kv_host_mem
    assert Path(args.kv_disk).parent == cache_dir()
    assert str(cache_dir()).startswith(os.environ["XDG_CACHE_HOME"])  # the conftest's tmp dir
    off = build_parser().parse_args(["chat", "--no-kv-host", "--no-kv-disk", "--page-size", "32"])
    apply_cache_defaults(off)
    assert (off.page_size, off.kv_host_mem, off.kv_disk) == (32, None, None)
    other = tmp_path / "m"
    other.mkdir()
    plain = build_parser().parse_args(["serve", "--model", str(other)])
    apply_cache_defaults(plain)
    assert (plain.page_size, plain.kv_host_mem, plain.kv_disk) == (64, None, None)


def test_tui_view_reads_the_runner_and_never_steps(tiny_dsa):
    engine = Engine(tiny_dsa, EngineConfig(device="cpu", page_size=4))
    app = create_app(engine, ServeOptions(model_name="tiny"))
    view = LocalView(app.state.runner)
    with UvicornThread(app) as srv:
        import httpx

        body = {"model": "tiny", "prompt": [3, 4, 5, 6, 7], "max_tokens": 4, "temperature": 0}
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 200
        steps = app.state.runner.steps

        async def run():
            tui = KvscopeApp(view, "inspect")
            async with tui.run_test(size=(110, 34)) as pilot:
                deadline = time.monotonic() + 10
                while not any(r.request_id == "completion-1" for r in tui.snapshot.requests):
                    assert time.monotonic() < deadline
                    await pilot.pause(0.05)
                assert READ_ONLY in tui.model_info["serving"]

        asyncio.run(run())
        assert app.state.runner.steps == steps  # the TUI did not drive the engine
