"""Where each weight goes: quantization, expert offload and the memory fit check.

`LoadOptions` is what the user asked for (``--quant``, ``--expert-cache``, ``--gpu-mem``,
``--cpu-mem`` ...). `WeightPlan` turns it into decisions before any weight is read: the expert
format, whether routed experts are offloaded and to which tier (pinned host memory or the
memory-mapped checkpoint), the expert-cache size in slots, and a fit check of every byte against
the budgets. A model that cannot fit raises one KvscopeError line that says what would fit.

Non-expert weights: on CUDA, `device_map()` asks accelerate (``infer_auto_device_map`` under
``max_memory``) how they spread over the GPUs and the CPU. The forward runs on one device today,
so a map that puts anything off the compute device is reported as a fit error; on a CPU-only
machine placement reduces to the fit check. The plan also builds the expert store and cache
while the model loads (`expert_bank`) and exposes the cache's telemetry (`stats()`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import KvscopeError
from runtime.model_config import ModelConfig
from runtime.weights import dense_cpu, fp8
from runtime.weights.checkpoint import Checkpoint
from runtime.weights.quant import (
    HEAD_METHOD,
    ExpertFormat,
    check_method,
    is_linear_weight,
    linear_nbytes,
)

TIERS = ("auto", "host", "mmap")
POLICIES = ("lru", "lfu")
GIB = 2**30


@dataclass(frozen=True)
class LoadOptions:
    quant: str = "none"  # none | nf4 | int8 | int4
    expert_cache: str | None = None  # "N" experts | SIZE | "P%"; None: experts stay resident
    expert_offload: str = "auto"  # auto | host | mmap (auto: host on CUDA, mmap on CPU)
    expert_policy: str = "lru"  # lru | lfu
    expert_prefetch: bool = True
    expert_cpu_compute: bool = False  # cold experts on the CPU when cheaper than the copy
    gpu_mem: int | None = None  # bytes for weights per GPU; None: free memory
    cpu_mem: int | None = None  # bytes of host memory for weights; None: MemAvailable
    mtp_layers: int = 0  # MTP layers loaded too (speculative decoding): 0 or 1


def parse_expert_cache(text: str) -> tuple[str, float]:
    """'64' -> ('experts', 64); '25%' -> ('fraction', 0.25); '2G' / '512MiB' -> ('bytes', n)."""
    s = str(text).strip()
    if re.fullmatch(r"[0-9]+", s):
        n = int(s)
        if n < 1:
            raise KvscopeError(f"--expert-cache {text}: needs at least 1 expert")
        return "experts", n
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", s)
    if m:
        f = float(m.group(1)) / 100
        if not 0 < f <= 1:
            raise KvscopeError(f"--expert-cache {text}: a percentage must be in (0, 100]")
        return "fraction", f
    return "bytes", _size(s, "--expert-cache")


def _size(text: str, flag: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", str(text).upper())
    if not m:
        raise KvscopeError(
            f"{flag} {text!r}: not a number of experts, a percentage or a size (512M, 2GiB)"
        )
    base = 1024 if m.group(3).startswith("I") else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def fmt_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"


def mem_available() -> int | None:
    """Linux MemAvailable in bytes (None elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True)
class Footprint:
    """Bytes of the weights once loaded (quantized where the plan quantizes)."""

    embed: int
    head: int  # final norm + LM head (0 when tied)
    layers: tuple[int, ...]  # non-expert bytes per decoder layer
    expert: int  # one routed expert in its stored format
    num_experts: int  # routed experts in the model (MoE layers x E)

    @property
    def non_expert(self) -> int:
        return self.embed + self.head + sum(self.layers)

    @property
    def experts(self) -> int:
        return self.expert * self.num_experts


def footprint(
    cfg: ModelConfig,
    ckpt: Checkpoint,
    dtype: torch.dtype,
    quant: str,
    keep_fp8: bool = False,
    mtp_layers: int = 0,
) -> Footprint:
    """Sizes from the checkpoint's shapes only (nothing is read); a tied LM head has no tensor of
    its own and costs nothing extra. ``mtp_layers``: the MTP layers loaded (their experts
    count as one more MoE layer's)."""
    n_layers = cfg.num_layers + mtp_layers
    layers = [0] * n_layers
    embed = head = 0
    for name in ckpt.keys():
        if name.endswith(fp8.SCALE_SUFFIX) or ".mlp.experts." in name:
            continue
        shape = ckpt.shape(name)
        numel = math.prod(shape)
        if is_linear_weight(name) and len(shape) == 2:
            is_fp8 = keep_fp8 and ckpt.has(fp8.scale_name(name)) and quant == "none"
            n = numel if is_fp8 else linear_nbytes(shape[0], shape[1], quant, dtype)
        else:
            n = numel * dtype.itemsize
        if name.startswith("model.layers."):
            li = int(name.split(".")[2])
            if li < n_layers:  # MTP layers beyond those loaded are not
                layers[li] += n
        elif name.startswith("model.embed_tokens."):
            embed += n
        elif name == "lm_head.weight" and quant != "none" and len(shape) == 2:
            head += linear_nbytes(shape[0], shape[1], HEAD_METHOD, dtype)  # stored int8
        else:
            head += n
    if quant != "none" and cfg.tie_word_embeddings and not ckpt.has("lm_head.weight"):
        head += linear_nbytes(cfg.vocab_size, cfg.hidden_size, HEAD_METHOD, dtype)  # a copy
    fmt = ExpertFormat(quant, dtype, cfg.hidden_size, cfg.moe_intermediate_size)
    n_moe = sum(t == "sparse" for t in cfg.mlp_layer_types) + mtp_layers
    return Footprint(embed, head, tuple(layers), fmt.nbytes, n_moe * cfg.n_routed_experts)


class WeightPlan:
    """Decisions for one model load (see module doc). Built by the engine before the weights are
    read; `runtime.models.base.WeightReader` and `load_moe` consult it while loading."""

    def __init__(
        self,
        options: LoadOptions,
        cfg: ModelConfig,
        ckpt: Checkpoint,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.options, self.cfg, self.ckpt = options, cfg, ckpt
        self.dtype, self.device = dtype, torch.device(device)
        self.quant = check_method(options.quant)
        if options.expert_offload not in TIERS:
            raise KvscopeError(f"expert offload {options.expert_offload!r}: choose {TIERS}")
        if options.expert_policy not in POLICIES:
            raise KvscopeError(f"expert cache policy {options.expert_policy!r}: choose {POLICIES}")
        self.keep_fp8 = self.quant == "none" and fp8.keep_fp8(self.device)
        self.fp8_block = fp8.block_size(ckpt.dir)
        self.fmt = ExpertFormat(self.quant, dtype, cfg.hidden_size, cfg.moe_intermediate_size)
        self.moe_layers = [i for i, t in enumerate(cfg.mlp_layer_types) if t == "sparse"]
        mtp = options.mtp_layers if cfg.n_routed_experts > 0 else 0
        self.moe_layers += [cfg.num_layers + i for i in range(mtp)]  # the MTP layer's MoE
        self.fp = footprint(cfg, ckpt, dtype, self.quant, self.keep_fp8, options.mtp_layers)
        self.offload = options.expert_cache is not None and bool(self.moe_layers)
        # bf16 linear weights prepacked for oneDNN (runtime/weights/dense_cpu.py): CPU, no
        # --quant, a CPU with oneDNN bf16 kernels, a model too large for a frozen compiled step
        self.pack_bf16 = (
            self.quant == "none"
            and self.device.type == "cpu"
            and dtype == torch.bfloat16
            and not self.offload
            and self.fp.non_expert + self.fp.experts > dense_cpu.PACK_MIN_BYTES
            and dense_cpu.available()
        )
        self.tier = None
        self.capacity = 0
        if self.offload:
            self.capacity = self._capacity(options.expert_cache)
            self.tier = options.expert_offload
            if self.tier == "auto":
                self.tier = "host" if self.device.type == "cuda" else "mmap"
                if self.tier == "host" and not self._host_fits_experts():
                    self.tier = "mmap"
        self.check_fit()
        self.cache = None  # ExpertCache, built when the first MoE layer loads
        self._store = None
        self._last_bank = None

    # ------------------------------------------------------------------ budgets
    def _capacity(self, text: str) -> int:
        kind, val = parse_expert_cache(text)
        total = self.fp.num_experts
        if kind == "experts":
            n = int(val)
        elif kind == "fraction":
            n = math.ceil(val * total)
        else:
            n = int(val) // self.fp.expert
            if n < 1:
                raise KvscopeError(
                    f"--expert-cache {text}: smaller than one expert ({fmt_bytes(self.fp.expert)})"
                )
        return max(1, min(n, total))

    def gpu_budget(self) -> int | None:
        if self.options.gpu_mem is not None:
            return self.options.gpu_mem
        if self.device.type == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.9)
        return None

    def cpu_budget(self) -> int | None:
        return self.options.cpu_mem if self.options.cpu_mem is not None else mem_available()

    def _host_fits_experts(self) -> bool:
        budget = self.cpu_budget()
        return budget is None or self.fp.experts <= budget

    def needs(self) -> dict[str, int]:
        """Bytes per place: 'device' (compute device) and 'host' (host RAM, excluding the OS page
        cache of a memory-mapped checkpoint). On CPU both are the same memory: 'host' holds all."""
        fp = self.fp
        on_dev = fp.non_expert
        host = 0
        if not self.offload:
            on_dev += fp.experts
        else:
            on_dev += self.capacity * fp.expert
            if self.tier == "host":
                host += fp.experts
        if self.device.type == "cpu":
            return {"device": 0, "host": on_dev + host}
        return {"device": on_dev, "host": host}

    def check_fit(self) -> None:
        """Raise one KvscopeError line when the weights cannot fit, saying what would."""
        need = self.needs()
        if self.device.type == "cpu":
            budget = self.cpu_budget()
            if budget is not None and need["host"] > budget:
                raise KvscopeError(
                    f"weights need {fmt_bytes(need['host'])} of host memory "
                    f"({self._what(need['host'])}) but {self._allows('cpu', budget)}; "
                    f"{self._hint(budget)}"
                )
            return
        gpu, cpu = self.gpu_budget(), self.cpu_budget()
        if gpu is not None and need["device"] > gpu:
            off = [
                k or "everything" for k, v in self.device_map().items() if not isinstance(v, int)
            ]
            placed = f" (accelerate would put {', '.join(off)} off the GPU)" if off else ""
            raise KvscopeError(
                f"weights need {fmt_bytes(need['device'])} on {self.device} "
                f"({self._what(need['device'])}) but {self._allows('gpu', gpu)}{placed}; "
                f"{self._hint(gpu)}"
            )
        if cpu is not None and need["host"] > cpu:
            raise KvscopeError(
                f"offloaded experts need {fmt_bytes(need['host'])} of host memory but "
                f"{self._allows('cpu', cpu)}; use --expert-cache with experts memory-mapped "
                "from disk (the default on CPU)"
            )

    def _what(self, need: int) -> str:
        extra = need - self.fp.non_expert
        what = f"non-expert {fmt_bytes(self.fp.non_expert)}"
        return what + (f" + experts {fmt_bytes(extra)}" if extra > 0 else "")

    def _allows(self, kind: str, budget: int) -> str:
        given = self.options.gpu_mem if kind == "gpu" else self.options.cpu_mem
        flag = "--gpu-mem" if kind == "gpu" else "--cpu-mem"
        if given is not None:
            return f"{flag} allows {fmt_bytes(budget)}"
        return f"only {fmt_bytes(budget)} is free"

    def _hint(self, budget: int) -> str:
        """What would fit in ``budget`` bytes of the compute device's memory."""
        fp = self.fp
        where = "memory-mapped from disk" if self.device.type == "cpu" else "in host memory"
        if self.moe_layers and budget - fp.non_expert >= fp.expert:
            n = min((budget - fp.non_expert) // fp.expert, fp.num_experts)
            return f"fits with --expert-cache {n} (routed experts {where})"
        if self.quant != "int4":
            q = footprint(
                self.cfg, self.ckpt, self.dtype, "int4", mtp_layers=self.options.mtp_layers
            )
            if self.moe_layers and budget - q.non_expert >= q.expert:
                n = min((budget - q.non_expert) // q.expert, q.num_experts)
                return f"fits with --quant int4 --expert-cache {n}"
            return (
                f"the non-expert weights alone need {fmt_bytes(fp.non_expert)} "
                f"({fmt_bytes(q.non_expert)} with --quant int4)"
            )
        return f"the non-expert weights alone need {fmt_bytes(fp.non_expert)}"

    def device_map(self, max_memory: dict | None = None) -> dict[str, object]:
        """accelerate's placement of the non-expert modules (embed, layers.i, head) under
        ``max_memory`` (default: this plan's GPU budget minus the expert bytes kept on it, and
        the CPU budget). Keys are module names, values a GPU index, 'cpu' or 'disk'."""
        import torch.nn as nn
        from accelerate import infer_auto_device_map

        class Blob(nn.Module):  # one module per unit that must stay on one device
            def __init__(self, nbytes: int):
                super().__init__()
                self.w = nn.Parameter(
                    torch.empty(max(nbytes, 1), dtype=torch.uint8, device="meta"),
                    requires_grad=False,
                )

        root = nn.Module()
        root.embed = Blob(self.fp.embed)
        root.layers = nn.ModuleList(Blob(b) for b in self.fp.layers)
        root.head = Blob(self.fp.head)
        if max_memory is None:
            expert_dev = self.needs()["device"] - self.fp.non_expert
            max_memory = {"cpu": self.cpu_budget() or 0}
            if self.device.type == "cuda":
                idx = self.device.index or 0
                max_memory[idx] = max(0, (self.gpu_budget() or 0) - expert_dev)
        return dict(infer_auto_device_map(root, max_memory, no_split_module_classes=["Blob"]))

    # ------------------------------------------------------------------ loading
    def _make_store(self):
        from runtime.weights.expert_cache import ExpertCache
        from runtime.weights.expert_store import HostExpertStore, MmapExpertStore

        e = self.cfg.n_routed_experts
        if self.tier == "host":
            store = HostExpertStore(self.fmt, e, pin=self.device.type == "cuda")
        else:
            store = MmapExpertStore(self.fmt, e, self.ckpt)
        self._store = store
        self.cache = ExpertCache(
            store,
            self.capacity,
            self.device,
            self.cfg.num_layers + self.options.mtp_layers,
            self.moe_layers,
            policy=self.options.expert_policy,
            prefetch=self.options.expert_prefetch,
            cpu_compute=self.options.expert_cpu_compute,
        )

    def expert_bank(self, layer: int, prefix: str, router):
        """Register layer ``layer``'s routed experts with the store and return its bank
        (runtime/weights/expert_cache.LayerExperts); links the previous MoE layer's look-ahead
        to this layer's router."""
        from runtime.weights.expert_cache import LayerExperts
        from runtime.weights.expert_store import ExpertNames, HostExpertStore, read_expert

        if self.cache is None:
            self._make_store()
        store = self._store
        if isinstance(store, HostExpertStore):
            names = ExpertNames(self.ckpt, prefix)
            ck = self.ckpt
            records = [
                self.fmt.encode(*read_expert(ck.get, ck.has, names, x, self.fp8_block, self.dtype))
                for x in range(store.num_experts)
            ]
            store.add_layer(layer, records)
        else:
            store.add_layer(layer, prefix)
        bank = LayerExperts(self.cache, layer)
        if self._last_bank is not None:
            self._last_bank.next = (bank, router)
        self._last_bank = bank
        return bank

    # ------------------------------------------------------------------ telemetry
    def stats(self):
        """ExpertStats of the expert cache, or None when experts are resident."""
        return self.cache.stats() if self.cache is not None else None

    def expert_heat(self) -> tuple[tuple[int, ...], ...]:
        s = self.stats()
        return s.heat if s is not None else ()

    def describe(self) -> dict[str, str]:
        out = {"quant": self.quant}
        if self.offload:
            out["experts"] = (
                f"offloaded ({self.tier}), cache {self.capacity}/{self.fp.num_experts} "
                f"x {fmt_bytes(self.fp.expert)} ({self.options.expert_policy})"
            )
        return out
