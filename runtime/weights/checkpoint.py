"""Lazy safetensors checkpoint access (single file or sharded with an index).

Files are opened with `safe_open` (memory-mapped); a tensor is materialised only when `get()` is
called, once, in the dtype asked for. Nothing reads a whole file up front.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _check_header(path: Path) -> None:
    """Reject missing or truncated files with a clear message before safe_open sees them."""
    if not path.is_file():
        raise CheckpointError(f"{path}: safetensors file not found; re-download the checkpoint")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors header; re-download it")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download it") from None
    end = max(
        (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
    )
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, needs {8 + n + end}); re-download"
        )


class Checkpoint:
    """Name -> tensor access over one or more safetensors files of a model directory."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        single = self.dir / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = [SINGLE_NAME], None
        else:
            shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(
                    f"{self.dir}: no model.safetensors or {INDEX_NAME}; not a checkpoint directory"
                )
            files, weight_map = shards, None
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.dir / name
            _check_header(path)
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot open ({e})") from None
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if missing:
                raise CheckpointError(
                    f"{index}: tensor '{missing[0]}' listed for {weight_map[missing[0]]} "
                    "is not in that file"
                )

    def keys(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.dir / self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        self._need(name)
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def _need(self, name: str) -> None:
        if name not in self._where:
            raise CheckpointError(f"{self.dir}: tensor '{name}' missing from the checkpoint")

    def get(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        expect_shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Read one tensor (checked against `expect_shape`, the shape config.json implies)."""
        self._need(name)
        if expect_shape is not None and self.shape(name) != tuple(expect_shape):
            raise CheckpointError(
                f"{self.file_of(name)}: tensor '{name}' has shape {list(self.shape(name))} but "
                f"config.json implies {list(expect_shape)}; config and weights do not match"
            )
        t = self._handles[self._where[name]].get_tensor(name)
        return t if dtype is None else t.to(dtype)
