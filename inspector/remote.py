"""Attach mode: an engine object for the inspector that mirrors a running `kvscope serve`.

`RemoteEngine(url, api_key)` reads the server's snapshot stream (server-sent events of
EngineSnapshot JSON at /kvscope/v1/snapshots) on a background thread and rebuilds
`runtime.telemetry` dataclasses, so the inspector draws the server's live tiers, page map,
requests and integrity log. The server's engine thread drives the engine: here `step()` does
nothing and `has_work()` is False; `submit()` raises (send requests to the server's API).
Standard library HTTP only (no torch, no extra client).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

from inspector.engine_protocol import ReadOnlyEngine
from runtime.telemetry import (
    EngineSnapshot,
    IntegrityEvent,
    PageInfo,
    RadixSummary,
    RequestInfo,
    TierUsage,
)

READ_ONLY = "attached to a server: chat is not available here; send requests to its API"


def _tuples(rows) -> tuple:
    return tuple(tuple(r) for r in rows)


def snapshot_from_json(d: dict) -> EngineSnapshot:
    """The JSON of `dataclasses.asdict(EngineSnapshot)` -> the frozen dataclasses again."""
    r = d["radix"]
    return EngineSnapshot(
        time_s=d["time_s"],
        model=d["model"],
        arch=d["arch"],
        device=d["device"],
        page_size=d["page_size"],
        tiers=tuple(TierUsage(**t) for t in d["tiers"]),
        pages=tuple(
            PageInfo(**{**p, "owners": tuple(p["owners"]), "tiers": tuple(p["tiers"])})
            for p in d["pages"]
        ),
        requests=tuple(RequestInfo(**q) for q in d["requests"]),
        radix=RadixSummary(
            nodes=r["nodes"],
            cached_tokens=r["cached_tokens"],
            longest_prefixes=_tuples(r["longest_prefixes"]),
            hits_by_tier=dict(r["hits_by_tier"]),
        ),
        transfers_in_flight=d.get("transfers_in_flight", 0),
        evictions=d.get("evictions", 0),
        drained_pages=d.get("drained_pages", 0),
        decode_tok_per_s=d.get("decode_tok_per_s", 0.0),
        prefill_tok_per_s=d.get("prefill_tok_per_s", 0.0),
        tokens_generated=d.get("tokens_generated", 0),
        integrity_events=tuple(
            IntegrityEvent(**{**e, "pages": tuple(e.get("pages", ()))})
            for e in d.get("integrity_events", ())
        ),
        expert_heat=_tuples(d.get("expert_heat", ())),
        layer_owners=_tuples(d.get("layer_owners", ())),
        extra=dict(d.get("extra", {})),
    )


class AttachError(Exception):
    """The server cannot be reached or refused the key (one line, for the CLI)."""


class RemoteEngine(ReadOnlyEngine):
    """EngineProtocol over HTTP: snapshots from the server's stream, nothing else driven."""

    read_only_reason = READ_ONLY

    def __init__(self, url: str, api_key: str | None = None, interval_s: float = 0.5):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.interval_s = interval_s
        self._info = self._get_json("/kvscope/v1/info")  # fails fast with a clear error
        self._snap: EngineSnapshot | None = None
        self._got = threading.Event()
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._follow, name="kvscope-attach", daemon=True)
        self._thread.start()
        if not self._got.wait(10.0):
            raise AttachError(f"{self.url}: no snapshot within 10 s ({self.error or 'no data'})")

    # ------------------------------------------------------------ HTTP
    def _open(self, path: str, timeout: float):
        req = urllib.request.Request(self.url + path)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 401:
                raise AttachError(f"{self.url}: the server wants an API key (--api-key)") from None
            raise AttachError(f"{self.url}{path}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AttachError(
                f"{self.url}: cannot connect ({reason}); is `kvscope serve` running?"
            ) from None

    def _get_json(self, path: str) -> dict:
        with self._open(path, 10.0) as resp:
            return json.loads(resp.read())

    def _follow(self) -> None:
        """Read the SSE stream; reconnect after a drop until close()."""
        path = f"/kvscope/v1/snapshots?interval={self.interval_s}"
        while not self._stop.is_set():
            try:
                with self._open(path, 30.0) as resp:
                    for raw in resp:
                        if self._stop.is_set():
                            return
                        line = raw.decode().strip()
                        if line.startswith("data: "):
                            self._snap = snapshot_from_json(json.loads(line[6:]))
                            self.error = None
                            self._got.set()
            except (AttachError, OSError, ValueError, KeyError, TypeError) as e:
                self.error = str(e)
            self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------ EngineProtocol
    def snapshot(self) -> EngineSnapshot:
        return self._snap  # type: ignore[return-value]  (set before __init__ returns)

    def model_info(self) -> dict[str, str]:
        info = {k: str(v) for k, v in self._info.items()}
        info["attached"] = f"{self.url} (read-only: {READ_ONLY})"
        if self.error:
            info["connection"] = self.error
        return info
