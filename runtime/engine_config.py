"""EngineConfig: every runtime knob, validated, in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.errors import KvscopeError
from runtime.integrity.config import IntegrityConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    page_size: int = 64
    kv_mem: int | None = None  # bytes for the L1 pool; None = enough for max_running contexts
    max_batch_tokens: int = 512  # prefill chunk budget per step
    max_running: int = 16
    timeout_s: float | None = None  # default per-request timeout
    # KV tiers (runtime/kv/, docs/architecture.md)
    kv_host_mem: int | None = None  # bytes of the L2 host pool; None = no L2
    kv_disk: str | None = None  # directory of the L3 disk store; None = no L3
    kv_disk_size: int = 4 << 30  # L3 byte budget
    write_policy: str = "write_through"  # write_through | write_through_selective | write_back
    preempt: str = "recompute"  # recompute | swap (back pages up to L2 first)
    unsafe: bool = False  # protections off: no drain, no fence waits, no checksums (demo only)
    integrity: IntegrityConfig = field(default_factory=IntegrityConfig)
    # Weights (runtime/weights/placement.py, docs/quantization.md)
    quant: str = "none"  # none | nf4 | int8 | int4
    gpu_mem: int | None = None  # bytes of GPU memory for weights; None = free memory
    cpu_mem: int | None = None  # bytes of host memory for weights; None = MemAvailable
    expert_cache: str | None = None  # "N" experts | SIZE | "P%"; None = experts resident
    expert_offload: str = "auto"  # auto | host | mmap: where offloaded experts live
    expert_policy: str = "lru"  # lru | lfu
    expert_prefetch: bool = True  # prefetch the next layer's predicted experts
    expert_cpu_compute: bool = False  # cold experts on the CPU when cheaper than the copy
    # Decode steps on CPU through AOTInductor-compiled buckets (runtime/models/cpu_graph.py)
    cpu_graph: str = "auto"  # auto (compile in the background, eager until ready) | off
    # Speculative decoding with the checkpoint's MTP layer (runtime/speculative.py): draft
    # tokens per step; None = auto (on when the checkpoint has MTP layers), 0 = off.
    speculative: int | None = None

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise KvscopeError("--device cuda: no CUDA device is available; use --device cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise KvscopeError(f"--dtype {self.dtype}: choose auto, {', '.join(DTYPES)}")
        return DTYPES[self.dtype]
