"""`kvscope inspect --attach`: the Textual inspector on a live server's snapshot stream.

A real uvicorn server (with an API key) runs a long streamed request while the inspector,
attached through inspector.remote.RemoteEngine, shows that request's pages in its page map.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from app.serve.protocol import Limits
from app.serve.server import ServeOptions, create_app
from inspector.app import KvscopeApp
from inspector.remote import READ_ONLY, AttachError, RemoteEngine
from inspector.screens.inspect import InspectScreen
from inspector.widgets.page_map import PageMap
from runtime.engine import Engine, EngineConfig
from tests.app.serve_helpers import SlowEngine, UvicornThread, write_glm_checkpoint

KEY = "attach-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_glm_checkpoint(tmp_path_factory.mktemp("glm_attach"))
    engine = SlowEngine(Engine(ckpt, EngineConfig(device="cpu", page_size=4, max_running=2)), 0.05)
    opts = ServeOptions(model_name="glm-test", api_key=KEY, limits=Limits(max_tokens=300))
    with UvicornThread(create_app(engine, opts)) as srv:
        yield srv


def test_attach_needs_the_key_and_a_server(server):
    with pytest.raises(AttachError, match="API key"):
        RemoteEngine(server.url)
    with pytest.raises(AttachError, match="cannot connect"):
        RemoteEngine("http://127.0.0.1:9")


async def _wait(pilot, cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await pilot.pause(0.05)


def test_inspector_shows_the_pages_of_a_running_request(server):
    stop = threading.Event()
    started = threading.Event()

    def client():  # a long stream, dropped when the test is done
        body = {"model": "glm-test", "prompt": "one two three four five six", "max_tokens": 300}
        body["temperature"] = 0
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream(
            "POST",
            server.url + "/v1/completions",
            json=body | {"stream": True},
            headers=headers,
            timeout=60,
        ) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return

    t = threading.Thread(target=client, daemon=True)
    t.start()
    assert started.wait(30)
    remote = RemoteEngine(server.url, KEY, interval_s=0.1)

    async def run():
        app = KvscopeApp(remote, "inspect")
        app.animation_level = "none"
        async with app.run_test(size=(120, 40)) as pilot:
            assert isinstance(app.screen, InspectScreen)

            def running_pages():
                pages = app.screen.query_one(PageMap).pages
                return [p for p in pages if "completion-1" in p.owners and p.state != "FREE"]

            await _wait(pilot, lambda: len(running_pages()) >= 2)
            snap = app.snapshot
            req = next(r for r in snap.requests if r.request_id == "completion-1")
            assert req.status in ("prefill", "decode") and req.pages >= 2
            assert "attached" in app.model_info
            # chat is refused in attach mode, with the reason shown in the transcript
            await pilot.press("f1")
            app.screen.query_one("#prompt").value = "hi"
            await pilot.press("enter")
            await _wait(
                pilot, lambda: app.session.reply("chat-1") and app.session.reply("chat-1").error
            )
            assert READ_ONLY in app.session.reply("chat-1").error

    try:
        asyncio.run(run())
    finally:
        stop.set()
        remote.close()
        t.join(30)


def test_attach_client_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, inspector.remote, inspector.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
