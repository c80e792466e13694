"""Where routed experts live when they are offloaded from the compute device.

Two tiers, one interface (`ExpertStore.record(layer, e)` -> the expert's record: named host
tensors in the layout of its `ExpertFormat`, see runtime/weights/quant.py):

- `HostExpertStore`: every record resident in host memory, encoded once at load (quantized when
  ``--quant`` asks), stacked per layer and pinned when the compute device is CUDA so copies to the
  device are asynchronous DMA.
- `MmapExpertStore`: nothing resident; the expert's tensors are views on the memory-mapped
  safetensors files (`SafetensorsMmap`, the OS pages them in on demand) and a record is encoded
  when it is asked for (dtype cast, FP8 block dequantization, quantization).

Both are read-only after construction and safe to read from several threads (the expert cache's
prefetch worker reads while the model computes).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from runtime.errors import CheckpointError
from runtime.weights import fp8
from runtime.weights.checkpoint import DTYPES as _ST_DTYPES
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.quant import ExpertFormat


class SafetensorsMmap:
    """Zero-copy, read-only tensor views on a checkpoint's safetensors files (mmap, MAP_PRIVATE:
    pages load on first touch and are never written back)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._files: dict[Path, torch.Tensor] = {}
        self._meta: dict[Path, tuple[int, dict]] = {}

    def _file(self, path: Path) -> tuple[torch.Tensor, int, dict]:
        if path not in self._files:
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            size = path.stat().st_size
            self._files[path] = torch.from_file(
                str(path), shared=False, size=size, dtype=torch.uint8
            )
            self._meta[path] = (8 + n, header)
        base, header = self._meta[path]
        return self._files[path], base, header

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a view on the mapped file (copied only if misaligned)."""
        path = self.ckpt.file_of(name)
        data, base, header = self._file(path)
        info = header[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = (int(o) for o in info["data_offsets"])
        raw = data[base + start : base + end]
        if (base + start) % dtype.itemsize:
            raw = raw.clone()  # view() needs an aligned offset
        return raw.view(dtype).view(info["shape"])


class ExpertNames:
    """Checkpoint names of the routed experts of one layer (per-expert or fused layout)."""

    def __init__(self, ckpt: Checkpoint, prefix: str):
        self.prefix = prefix
        self.fused = ckpt.has(f"{prefix}.experts.gate_up_proj")

    def parts(self, e: int) -> dict[str, tuple[str, int | None]]:
        """part -> (tensor name, index into a fused stack or None)."""
        p = self.prefix
        if self.fused:
            return {
                "gate_up": (f"{p}.experts.gate_up_proj", e),
                "down": (f"{p}.experts.down_proj", e),
            }
        q = f"{p}.experts.{e}"
        return {
            "gate": (f"{q}.gate_proj.weight", None),
            "up": (f"{q}.up_proj.weight", None),
            "down": (f"{q}.down_proj.weight", None),
        }


def read_expert(get, has, names: ExpertNames, e: int, block, dtype: torch.dtype):
    """Full-precision (gate_up [2I, D], down [D, I]) of expert e, in ``dtype``, through ``get``
    (name -> tensor) and ``has`` (name -> bool); FP8 block-scaled weights are dequantized."""
    out = {}
    for part, (name, idx) in names.parts(e).items():
        t = get(name)
        if idx is not None:
            t = t[idx]
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and has(fp8.scale_name(name)):
            t = fp8.dequantize_fp8_block(t, get(fp8.scale_name(name)), block, dtype)
        out[part] = t.to(dtype)
    if "gate_up" not in out:
        out["gate_up"] = torch.cat([out.pop("gate"), out.pop("up")], dim=0)
    return out["gate_up"], out["down"]


class ExpertStore:
    """Records of the routed experts of every MoE layer. Read-only, thread-safe."""

    tier = "?"

    def __init__(self, fmt: ExpertFormat, num_experts: int):
        self.fmt, self.num_experts = fmt, num_experts

    def record(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def pinned(self) -> bool:
        return False

    @property
    def host_nbytes(self) -> int:
        """Host memory the store keeps resident (not counting the OS page cache)."""
        return 0


class HostExpertStore(ExpertStore):
    """Encoded records resident in host memory, one stack [E, ...] per record key and layer,
    pinned when ``pin`` (the compute device is CUDA)."""

    tier = "host"

    def __init__(self, fmt: ExpertFormat, num_experts: int, pin: bool = False):
        super().__init__(fmt, num_experts)
        self.pin = pin and torch.cuda.is_available()
        self._layers: dict[int, dict[str, torch.Tensor]] = {}

    def add_layer(self, layer: int, records: list[dict[str, torch.Tensor]]) -> None:
        assert len(records) == self.num_experts
        stacks = {}
        for key, (shape, dt) in self.fmt.spec().items():
            s = torch.empty((self.num_experts, *shape), dtype=dt, pin_memory=self.pin)
            for e, rec in enumerate(records):
                s[e].copy_(rec[key].reshape(shape))
            stacks[key] = s
        self._layers[layer] = stacks

    def record(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        return {k: s[e] for k, s in self._layers[layer].items()}

    @property
    def pinned(self) -> bool:
        return self.pin

    @property
    def host_nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for d in self._layers.values() for s in d.values())


class MmapExpertStore(ExpertStore):
    """Experts read from the memory-mapped safetensors files and encoded on each request."""

    tier = "mmap"

    def __init__(self, fmt: ExpertFormat, num_experts: int, ckpt: Checkpoint):
        super().__init__(fmt, num_experts)
        self.ckpt = ckpt
        self.mmap = SafetensorsMmap(ckpt)
        self.block = fp8.block_size(ckpt.dir)
        self._names: dict[int, ExpertNames] = {}

    def add_layer(self, layer: int, prefix: str) -> None:
        names = ExpertNames(self.ckpt, prefix)
        fmt = self.fmt
        for part, (name, idx) in names.parts(0).items():  # shape checks, once per layer
            shape = self.ckpt.shape(name)
            want = {"gate": (fmt.i, fmt.d), "up": (fmt.i, fmt.d), "down": (fmt.d, fmt.i)}
            want["gate_up"] = (2 * fmt.i, fmt.d)
            exp = want[part] if idx is None else (self.num_experts, *want[part])
            if shape != exp:
                raise CheckpointError(
                    f"{self.ckpt.file_of(name)}: tensor '{name}' has shape {list(shape)} but "
                    f"config.json implies {list(exp)}; config and weights do not match"
                )
        self._names[layer] = names

    def raw(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up, down) in the compute dtype, straight from the mapped files."""
        return read_expert(
            self.mmap.view, self.ckpt.has, self._names[layer], e, self.block, self.fmt.dtype
        )

    def record(self, layer: int, e: int) -> dict[str, torch.Tensor]:
        return self.fmt.encode(*self.raw(layer, e))
