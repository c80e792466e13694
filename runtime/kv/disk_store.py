"""L3 disk store: one file per page under a directory with a byte budget; survives restarts.

File = MAGIC (8 bytes) | header length (u32 LE) | header CRC32 (u32 LE) | header JSON | payload.
The header names the format version, the model fingerprint, the layer range, the token-prefix
hash (the page's key, see radix.chain_hash), page_size and, per plane, name / shape / dtype /
byte count / checksum (runtime/kv/checksum.py, the checksum of the L1 data the copy came from:
invariant 4). The payload is the planes' raw bytes in header order, each [layers, page_size,
*tail]. Files are written crash-safe (temp file, fsync, rename, fsync of the directory).

A file that is damaged (bad magic, CRC, JSON, size or checksum), truncated, foreign (another
fingerprint) or stale (another format, page size, layer range or plane layout) is a MISS and is
deleted; it is never served. One directory belongs to one model. The index (key -> size, in LRU
order) is rebuilt at start by scanning the directory (headers only); the LRU order persists
through file mtimes (a hit touches the file). Eviction removes least recently used files until
a new page fits the budget.

Thread-safe: `get`/`put` run on the copy thread while the engine thread calls `contains`.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from runtime.kv.checksum import page_checksums
from runtime.kv.host_pool import PlaneSpec

__all__ = ["DiskStore", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MAGIC = b"KVSPAGE\x01"
_PRE = struct.Struct("<8sII")  # magic, header length, header crc32
_SUFFIX = ".kvp"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name}")
    return dt


class DiskStore:
    """Pages of one model under `root`, at most `budget_bytes` of page files."""

    def __init__(
        self,
        root: str | os.PathLike,
        budget_bytes: int,
        fingerprint: str,
        page_size: int,
        layer_range: tuple[int, int],
        specs: Mapping[str, PlaneSpec],
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        self.fingerprint = fingerprint
        self.page_size = page_size
        self.layer_range = (int(layer_range[0]), int(layer_range[1]))
        self.specs = dict(specs)
        self._lock = threading.Lock()
        self._index: OrderedDict[int, int] = OrderedDict()  # key -> file bytes, LRU first
        self._bytes = 0
        self.stats = {"hits": 0, "misses": 0, "rejected": 0, "writes": 0, "evictions": 0}
        self._scan()

    # ---- queries ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def num_pages(self) -> int:
        return len(self._index)

    @property
    def page_bytes(self) -> int:
        return sum(s.page_bytes(self.num_layers, self.page_size) for s in self.specs.values())

    def contains(self, key: int) -> bool:
        """Whether a page file for `key` is indexed (not yet verified: `get` may still miss)."""
        with self._lock:
            return key in self._index

    def path_of(self, key: int) -> Path:
        return self.root / f"{key:016x}{_SUFFIX}"

    # ---- read / write -----------------------------------------------------------------------
    def put(self, key: int, page: Mapping[str, torch.Tensor], checksums: Mapping[str, int]) -> bool:
        """Write page `key` (planes [layers, page_size, *tail]) carrying `checksums`.

        Evicts LRU files to fit the budget; False when the page cannot fit or the write fails.
        An existing file for `key` is replaced atomically.
        """
        planes, blobs = [], []
        for name, spec in self.specs.items():
            t = page[name]
            assert tuple(t.shape) == (self.num_layers, self.page_size, *spec.tail), (name, t.shape)
            assert t.dtype == spec.dtype
            blob = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            blobs.append(blob.tobytes())
            planes.append(
                {
                    "name": name,
                    "shape": list(t.shape),
                    "dtype": str(spec.dtype),
                    "nbytes": len(blobs[-1]),
                    "checksum": f"{checksums[name]:016x}",
                }
            )
        header = json.dumps(self._header(key, planes), sort_keys=True).encode()
        data = _PRE.pack(_MAGIC, len(header), zlib.crc32(header)) + header + b"".join(blobs)
        if not self._make_room(key, len(data)):
            return False
        path = self.path_of(key)
        tmp = self.root / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._fsync_dir()
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        with self._lock:
            self._bytes -= self._index.pop(key, 0)
            self._index[key] = len(data)
            self._bytes += len(data)
            self.stats["writes"] += 1
        return True

    def get(self, key: int, out: Mapping[str, torch.Tensor] | None = None) -> dict[str, int] | None:
        """Read and verify page `key`; copy its planes into `out` ([layers, page_size, *tail]).

        Returns the checksums it carries, or None on a miss. A damaged, truncated, foreign or
        stale file is a miss and is deleted; nothing is written into `out` unless it verified.
        """
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except OSError:
            self._forget(key)
            self.stats["misses"] += 1
            return None
        page = self._decode(key, data)
        if page is None:
            self.stats["rejected"] += 1
            self.stats["misses"] += 1
            self.delete(key)
            return None
        tensors, sums = page
        if out is not None:
            for name, t in tensors.items():
                out[name].copy_(t)
        try:
            os.utime(path)  # LRU by mtime survives restarts
        except OSError:
            pass
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        self.stats["hits"] += 1
        return sums

    def delete(self, key: int) -> None:
        self._forget(key)
        self.path_of(key).unlink(missing_ok=True)

    # ---- internals --------------------------------------------------------------------------
    def _header(self, key: int, planes: list[dict]) -> dict:
        return {
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "layers": list(self.layer_range),
            "prefix_hash": f"{key:016x}",
            "page_size": self.page_size,
            "planes": planes,
        }

    def _parse_header(self, data: bytes) -> tuple[dict, int] | None:
        """(header, payload offset) when the preamble and header are intact and ours."""
        if len(data) < _PRE.size:
            return None
        magic, hlen, crc = _PRE.unpack_from(data)
        end = _PRE.size + hlen
        if magic != _MAGIC or len(data) < end or zlib.crc32(data[_PRE.size : end]) != crc:
            return None
        try:
            header = json.loads(data[_PRE.size : end])
        except ValueError:
            return None
        expected_planes = [
            (name, [self.num_layers, self.page_size, *spec.tail], str(spec.dtype))
            for name, spec in self.specs.items()
        ]
        try:
            planes = [(p["name"], p["shape"], p["dtype"]) for p in header["planes"]]
            ok = (
                header["version"] == FORMAT_VERSION
                and header["fingerprint"] == self.fingerprint
                and header["layers"] == list(self.layer_range)
                and header["page_size"] == self.page_size
                and planes == expected_planes
            )
        except (KeyError, TypeError):
            return None
        return (header, end) if ok else None

    def _decode(self, key: int, data: bytes) -> tuple[dict, dict[str, int]] | None:
        parsed = self._parse_header(data)
        if parsed is None:
            return None
        header, offset = parsed
        if header["prefix_hash"] != f"{key:016x}":
            return None
        total = offset + sum(int(p["nbytes"]) for p in header["planes"])
        if len(data) != total:
            return None
        tensors, sums = {}, {}
        buf = bytearray(data)
        for p in header["planes"]:
            n = int(p["nbytes"])
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=offset)
            offset += n
            dtype = _dtype(p["dtype"])
            t = raw.view(dtype).reshape(p["shape"])
            if page_checksums({"x": t.unsqueeze(1)}, [0])[0]["x"] != int(p["checksum"], 16):
                return None
            tensors[p["name"]] = t
            sums[p["name"]] = int(p["checksum"], 16)
        return tensors, sums

    def _scan(self) -> None:
        """Rebuild the index from the directory; drop temp files and files that are not ours."""
        found = []
        for entry in os.scandir(self.root):
            name = entry.name
            if name.endswith(".tmp"):
                Path(entry.path).unlink(missing_ok=True)  # a write cut short by a crash
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                key = int(name[: -len(_SUFFIX)], 16)
                st = entry.stat()
                with open(entry.path, "rb") as f:
                    head = f.read(_PRE.size)
                    if len(head) == _PRE.size:
                        head += f.read(_PRE.unpack(head)[1])
            except (ValueError, OSError, struct.error):
                Path(entry.path).unlink(missing_ok=True)
                continue
            if self._parse_header(head) is None:
                Path(entry.path).unlink(missing_ok=True)
                self.stats["rejected"] += 1
                continue
            found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._bytes += size

    def _make_room(self, key: int, size: int) -> bool:
        if size > self.budget_bytes:
            return False
        victims = []
        with self._lock:
            used = self._bytes - self._index.get(key, 0)
            for k, s in self._index.items():
                if used + size <= self.budget_bytes:
                    break
                if k != key:
                    victims.append(k)
                    used -= s
            if used + size > self.budget_bytes:
                return False
        for k in victims:
            self.delete(k)
            self.stats["evictions"] += 1
        return True

    def _forget(self, key: int) -> None:
        with self._lock:
            self._bytes -= self._index.pop(key, 0)

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
