"""kvscope inspector: the Textual TUI (chat + live cache inspector) and batch progress output.

Reads `runtime.telemetry` snapshots and calls the engine API only; never imports torch.

    from inspector import run_app, BatchProgress
    run_app(engine, screen="chat")          # or "inspect"; blocks until the user quits

Textual is imported lazily, so `kvscope batch` can use `BatchProgress` without loading it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inspector.app import KvscopeApp, run_app
    from inspector.batch_progress import BatchProgress

__all__ = ["BatchProgress", "KvscopeApp", "run_app"]


def __getattr__(name: str) -> Any:
    if name in ("KvscopeApp", "run_app"):
        from inspector import app

        return getattr(app, name)
    if name == "BatchProgress":
        from inspector.batch_progress import BatchProgress

        return BatchProgress
    raise AttributeError(f"module 'inspector' has no attribute {name!r}")
