"""Where background compiles report (runtime/models/cpu_graph.py): nothing of torch's own logging
or warnings from a compile thread reaches the terminal; the detail goes to a log file in the
user's cache dir (``failure_log()``), and the caller prints one line. ``--verbose`` (the CLI sets
KVSCOPE_VERBOSE=1) lets it through to stderr as well.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from pathlib import Path

THREAD_NAME = "kvscope-cpu-graph"  # the compile threads' name: what the filters recognise


def verbose() -> bool:
    """--verbose (app/cli.py sets KVSCOPE_VERBOSE=1): tracebacks on stderr too."""
    return os.environ.get("KVSCOPE_VERBOSE", "0") not in ("", "0")


def failure_log() -> Path:
    """Where failed compiles write their traceback (the user cache dir)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvscope" / "cpu_graph.log"


def log_detail(text: str) -> str:
    """Append ``text`` to failure_log(); returns where it went (or why it could not)."""
    path = failure_log()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{text}\n")
        return str(path)
    except OSError as e:
        return f"(log {path} not writable: {e.strerror})"


class _CompileThreadLogs(logging.Filter):
    """On torch's log handlers: records emitted by a compile thread go to failure_log(), not to
    the terminal (torch logs a failed export or lowering with its whole traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.current_thread().name != THREAD_NAME:
            return True
        if record.levelno >= logging.WARNING:
            log_detail(logging.Formatter().format(record))
        return verbose()


_FILTER = _CompileThreadLogs()
_SHOW_WARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings raised inside a compile thread go to failure_log() (unless --verbose)."""
    if threading.current_thread().name == THREAD_NAME and not verbose():
        log_detail(warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        return
    _SHOW_WARNING(message, category, filename, lineno, file, line)


warnings.showwarning = _show_warning


def quiet_torch_logs() -> None:
    """Attach the filter to every handler of torch's loggers (torch adds handlers lazily)."""
    loggers = [logging.getLogger("torch")]
    loggers += [
        lg
        for name, lg in logging.root.manager.loggerDict.items()
        if name.startswith("torch") and isinstance(lg, logging.Logger)
    ]
    handlers = [h for lg in loggers + [logging.getLogger()] for h in lg.handlers]
    if logging.lastResort is not None:  # what prints a record when no handler is configured
        handlers.append(logging.lastResort)
    for h in handlers:
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)
