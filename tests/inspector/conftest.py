"""Shared helpers for inspector tests: every test drives the deterministic FakeEngine.

`async def` tests here run in a fresh event loop (`asyncio.run`), so no async plugin is needed.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import pytest
from textual.pilot import Pilot


async def _wait_for(pilot: Pilot, cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the timeout")
        await pilot.pause(0.01)


async def _manual_steps(pilot: Pilot, n: int) -> None:
    app = pilot.app
    for _ in range(n):
        seen = app.steps_seen
        app.action_step_once()  # what the "." key does (pressing it costs ~0.1 s per step)
        await _wait_for(pilot, lambda seen=seen: app.steps_seen > seen)


async def _send(pilot: Pilot, text: str) -> None:
    pilot.app.screen.query_one("#prompt").value = text
    await pilot.press("enter")


@pytest.fixture
def send() -> Callable[[Pilot, str], Awaitable[None]]:
    """`await send(pilot, text)`: put `text` in the chat prompt and press Enter (typing each key
    through Pilot costs ~0.1 s; the typing itself is tested once)."""
    return _send


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[None]]:
    """`await wait_for(pilot, cond)`: let the app run until `cond()` is true (10 s limit)."""
    return _wait_for


@pytest.fixture
def manual_steps() -> Callable[[Pilot, int], Awaitable[None]]:
    """`await manual_steps(pilot, n)`: with the app paused, run exactly n engine steps and wait
    until the UI has handled each (one chart point per step: deterministic charts)."""
    return _manual_steps


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    asyncio.run(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names}))
    return True
