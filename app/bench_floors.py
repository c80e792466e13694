"""Physical floors and machine facts for `kvscope bench`.

- Copy bandwidth: one large tensor copy on the device, counted as bytes read + written per second
  (on CUDA also host-to-device from pinned and from pageable memory).
- Weight bytes per token, counted from the model config: embedding row + attention + dense MLP +
  (router + top-k routed experts + shared experts) per MoE layer + final norm + lm_head.
- Decode floor: a decode step has to read its active weights at least once, so
  tok/s <= batch * bandwidth / bytes read per step.
- Memory probes: CPU resident-set high-water (Linux VmHWM, reset through /proc/self/clear_refs),
  CUDA max_memory_allocated.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from runtime.model_config import ModelConfig

# ------------------------------------------------------------------------------ parameter counts


def _attention_params(cfg: ModelConfig, layer: int) -> int:
    d, h = cfg.hidden_size, cfg.num_heads
    bias = cfg.attention_bias
    if cfg.is_mla:
        ql, kl, r = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        nd, vd = cfg.qk_nope_head_dim, cfg.v_head_dim
        n = ql * d + ql + h * (nd + r) * ql  # q_a, q_a_layernorm, q_b
        n += (kl + r) * d + kl + h * (nd + vd) * kl  # kv_a_proj_with_mqa, kv_a_layernorm, kv_b
        n += d * h * vd  # o_proj
        n += (ql + (kl + r) + d) if bias else 0
        if cfg.indexer_types[layer] == "full":
            hi, di = cfg.index_n_heads, cfg.index_head_dim
            n += hi * di * ql + di * d + 2 * di + hi * d  # wq_b, wk, k_norm (w, b), weights_proj
        return n
    hk, dh = cfg.num_kv_heads, cfg.head_dim
    n = h * dh * d + 2 * hk * dh * d + d * h * dh  # q, k, v, o
    n += (h * dh + 2 * hk * dh) if bias else 0
    n += 2 * dh if cfg.use_qk_norm else 0
    return n


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters in all and read per token (batch 1), by part. MTP layers are not counted."""
    d, v = cfg.hidden_size, cfg.vocab_size
    expert = 3 * d * cfg.moe_intermediate_size
    parts = {k: 0 for k in ("embed_row", "attention", "norms", "dense_mlp", "router")}
    parts.update(routed_active=0, shared_experts=0, lm_head=v * d)
    total = v * d + d + (0 if cfg.tie_word_embeddings else v * d)
    parts["embed_row"], parts["norms"] = d, d
    for li in range(cfg.num_layers):
        attn = _attention_params(cfg, li)
        parts["attention"] += attn
        parts["norms"] += 2 * d
        total += attn + 2 * d
        if cfg.mlp_layer_types[li] == "sparse":
            e = cfg.n_routed_experts
            parts["router"] += e * d + e
            parts["routed_active"] += cfg.num_experts_per_tok * expert
            parts["shared_experts"] += cfg.n_shared_experts * expert
            total += e * d + e + e * expert + cfg.n_shared_experts * expert
        else:
            parts["dense_mlp"] += 3 * d * cfg.intermediate_size
            total += 3 * d * cfg.intermediate_size
    return {"total": total, "active_per_token": sum(parts.values()), "active_parts": parts}


def expected_distinct_experts(cfg: ModelConfig, batch: int) -> float:
    """Distinct routed experts a MoE layer reads for `batch` tokens, under uniform routing."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if e == 0:
        return 0.0
    return e * (1.0 - (1.0 - k / e) ** batch)


def bytes_per_step(cfg: ModelConfig, batch: int, dtype_bytes: int) -> float:
    """Weight bytes one decode step of `batch` tokens reads (embedding rows once per token)."""
    counts = param_counts(cfg)
    parts = counts["active_parts"]
    n_moe = sum(t == "sparse" for t in cfg.mlp_layer_types)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    shared = counts["active_per_token"] - parts["routed_active"] - parts["embed_row"]
    routed = n_moe * expected_distinct_experts(cfg, batch) * expert
    return (shared + routed + batch * parts["embed_row"]) * dtype_bytes


def decode_floor_tok_s(cfg: ModelConfig, batch: int, dtype_bytes: int, bw_bytes_s: float) -> float:
    return batch * bw_bytes_s / bytes_per_step(cfg, batch, dtype_bytes)


# ------------------------------------------------------------------------------ bandwidth


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> list[float]:
    """Device-to-device copy of one large tensor: (bytes read + written) / s, one per repeat."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in, warm the path
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        out.append(2 * n * 4 / (time.perf_counter() - t))
    return out


def h2d_bandwidth(device: torch.device, pinned: bool, nbytes: int = 256 << 20, repeats: int = 5):
    """Host-to-device bytes per second (CUDA only), one sample per repeat."""
    host = torch.ones(nbytes // 4, dtype=torch.float32, pin_memory=pinned)
    dst = torch.empty(host.shape, dtype=host.dtype, device=device)
    dst.copy_(host)
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(host, non_blocking=pinned)
        _sync(device)
        out.append(nbytes / (time.perf_counter() - t))
    return out


# ------------------------------------------------------------------------------ memory


class MemoryProbe:
    """Peak memory growth over a baseline: CPU RSS (VmHWM) and, on CUDA, allocated bytes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.hwm_resettable = _reset_hwm()

    def start(self) -> None:
        _trim()
        self.hwm_resettable = _reset_hwm()
        self.rss0 = _status_kb("VmRSS") * 1024
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda0 = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> dict[str, float]:
        peak = _status_kb("VmHWM") * 1024
        out = {"cpu": float(max(0, peak - self.rss0))}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["cuda"] = float(torch.cuda.max_memory_allocated(self.device) - self.cuda0)
        return out


def _status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource  # fallback: the process-lifetime high-water mark (not resettable)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _trim() -> None:
    """Return freed heap to the OS so the next baseline is not inflated by cached blocks."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    """Read-only git query on this checkout (None without git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "kvscope_git": None}
    try:
        from importlib.metadata import version

        out["kvscope"] = version("kvscope")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        out["kvscope"] = None
    out["kvscope_git"] = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "runtime", "kernels")
    out["kvscope_git_dirty"] = None if dirty is None else bool(dirty)  # uncommitted changes
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out
