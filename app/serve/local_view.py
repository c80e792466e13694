"""`kvscope serve --tui`: the inspector in the server's process, reading the runner's snapshots.

The server's engine thread drives the engine; this view never steps it (`has_work()` is False
and `step()` returns nothing), and chat from the TUI is refused with a clear message.
"""

from __future__ import annotations

from inspector.engine_protocol import ReadOnlyEngine
from runtime.telemetry import EngineSnapshot

READ_ONLY = "serving: chat is not available in the TUI; send requests to the server's API"


class LocalView(ReadOnlyEngine):
    read_only_reason = READ_ONLY

    def __init__(self, runner):
        self.runner = runner

    def snapshot(self) -> EngineSnapshot:
        self.runner.want_snapshots(1.0)  # the TUI polls at ~10 Hz: keep snapshots coming
        return self.runner.snapshot

    def model_info(self) -> dict[str, str]:
        info = dict(self.runner.engine.model_info())
        info["serving"] = READ_ONLY
        return info
