"""Lazy safetensors checkpoint access (single file or sharded with an index).

Only the files' headers are read up front; a tensor is read when `get()` is called, with plain
file reads into memory of its own (not a memory map of the file: the file's pages never count in
this process's resident memory, so a checkpoint that is quantized or converted at load leaves
only what the model keeps; docs/performance.md, peak RSS). Nothing reads a whole file at once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from runtime.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# safetensors dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _check_header(path: Path) -> tuple[dict, int]:
    """Reject missing or truncated files with a clear message; (header, offset of the data)."""
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
    header.pop("__metadata__", None)
    # The format's rule (safetensors checks it too): the tensors' byte ranges tile the data
    # region exactly, in order, without gaps or overlaps.
    try:
        spans = sorted(
            (int(v["data_offsets"][0]), int(v["data_offsets"][1])) for v in header.values()
        )
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download it") from None
    at = 0
    for lo, hi in spans:
        if lo != at or hi < lo:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (tensor byte ranges overlap or leave gaps); "
                "re-download it"
            )
        at = hi
    if 8 + n + at != size:
        raise CheckpointError(
            f"{path}: {size - 8 - n - at} bytes past the last tensor; re-download"
        )
    return header, 8 + n


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
        self._headers: dict[str, tuple[dict, int]] = {}  # file -> (header, data offset)
        self._where: dict[str, str] = {}
        for name in files:
            header, start = _check_header(self.dir / name)
            self._headers[name] = (header, start)
            for key in header:
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
        return tuple(self._headers[self._where[name]][0][name]["shape"])

    def _need(self, name: str) -> None:
        if name not in self._where:
            # name the file to look at: the one file, or the index of a sharded checkpoint
            files = list(self._headers)
            index = self.dir / INDEX_NAME
            where = (
                self.dir / files[0] if len(files) == 1 else index if index.is_file() else self.dir
            )
            raise CheckpointError(f"{where}: tensor '{name}' missing from the checkpoint")

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
        t = self._read(name)
        return t if dtype is None else t.to(dtype)

    def _read(self, name: str) -> torch.Tensor:
        """The tensor's bytes read from its file into a fresh buffer (see the module doc)."""
        file = self._where[name]
        header, start = self._headers[file]
        info = header[name]
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(
                f"{self.dir / file}: tensor '{name}' has dtype {info.get('dtype')!r}, which "
                f"kvscope does not read (one of {', '.join(DTYPES)})"
            )
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        lo, hi = (int(x) for x in info["data_offsets"])
        want = dtype.itemsize * int(torch.Size(shape).numel())
        if hi - lo != want:
            raise CheckpointError(
                f"{self.dir / file}: tensor '{name}' holds {hi - lo} bytes, its shape needs {want}"
            )
        if want == 0:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(want)
        with (self.dir / file).open("rb") as f:
            f.seek(start + lo)
            if f.readinto(buf) != want:
                raise CheckpointError(f"{self.dir / file}: tensor '{name}' is truncated")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)
