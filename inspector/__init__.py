"""kvscope inspector: the Textual TUI (chat + live cache inspector).

Reads `runtime.telemetry` snapshots and calls the engine API only; never imports torch.

    from inspector import run_app
    run_app(engine, screen="chat")          # or "inspect"; blocks until the user quits

Textual is imported lazily (importing `inspector` costs nothing until the app is used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inspector.app import KvscopeApp, run_app

__all__ = ["KvscopeApp", "run_app"]


def __getattr__(name: str) -> Any:
    if name in ("KvscopeApp", "run_app"):
        from inspector import app

        return getattr(app, name)
    raise AttributeError(f"module 'inspector' has no attribute {name!r}")
