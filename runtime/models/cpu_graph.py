"""Compiled decode steps on CPU: the CPU counterpart of cuda_graph.DecodeGraphs.

On CPU a small model's decode step is bound by per-op dispatch (~640 aten ops of a few
microseconds each for the demo model, docs/performance.md), not by arithmetic. Here a decode step
(one new token per sequence, flat row b = sequence b, last-token logits) runs as one
ahead-of-time compiled C++ function: runtime/models/decode_step.py is exported with
torch.export and compiled with AOTInductor, which fuses the elementwise work into a few C++
loops and calls the GEMMs directly; the loaded library is called without Dynamo guards or a
Python wrapper per kernel (the demo's step, batch 1: ~4.0 ms of CPU time eager, ~0.4 ms
compiled in a tight loop; torch.compile with the C++ wrapper measured ~0.7 ms).

Weights: a model of at most FROZEN_MAX_BYTES is compiled with its weights frozen in as
constants, so Inductor prepacks them and autotunes its own C++ micro-GEMMs (a copy of the
weights per bucket). A larger model's weights are inputs of the compiled step (nothing copied;
ATen GEMMs), traced over a private copy of the model's object tree so that the live model is
never touched while a bucket compiles.

Shapes are static per bucket (dynamic shapes cost ~60 % more per step in Inductor's CPU code):
the batch is padded to a BATCH_BUCKETS size (padding rows compute on position 0 and are
dropped), the context to a power-of-two number of columns >= MIN_COLUMNS (masked). Each
(batch, columns) bucket is compiled once, in a background thread, the first time a step needs
it (20-90 s on 2 cores); until it is ready that step runs eagerly, so no request ever waits
for the compiler. Compiled libraries are kept for the process (``_LIBRARIES``): another engine
of the same model and pool shape reuses them. Libraries over weight inputs are also kept across
runs in ``library_dir()`` ($XDG_CACHE_HOME/kvscope/cpu_graph), named by a digest of everything
they depend on (model structure and weight layout, bucket, pool shapes, kvscope's runtime/ and
kernels/ sources, torch, the CPU; never the weights' values, which are inputs): a later run of
the same model and format loads its buckets instead of compiling them. ``close()``
(Engine.close) ends the thread.

One compile at a time, process-wide (``_COMPILE_LOCK``): torch.export / Inductor keep tracing
state in process globals, and two compiles at once (a warm-up engine and the main one) failed
inside torch.fx (``KeyError: 'custom'``). A failed compile says so in one line on stderr (which
bucket, that decode stays eager, where the traceback went: ``failure_log()``, or stderr under
``--verbose``); torch's own log records of the compile thread go to that file too.

Shutdown (issue 15): a compile thread still inside a torch op when the interpreter finalizes is
killed by CPython with pthread_exit when it retakes the GIL; the forced unwind runs through
torch's C++ frames (pybind11's ``~gil_scoped_release``, noexcept) and libstdc++ calls
std::terminate: "terminate called without an active exception", exit 134, after every result
had been written. So no compile thread may outlive the interpreter: ``abandon_compiles()``
(registered to run before the interpreter joins threads, and called by app/shutdown.py with a
bound) drops the queued buckets and raises ``CompileAbandoned`` inside the compiling thread,
which it sees at its next Python bytecode (export and Inductor's code generation are Python;
the longest native stretch is the C++ compiler subprocess). The threads are not daemons, so if
one is still in native code when the bound is over, the interpreter waits for it rather than
crash; the CLI instead flushes and leaves with os._exit (app/shutdown.py).

Invariants kept as in the eager path:
- Reads: before the compiled step runs, the pool's read guard (fence waits of loads in flight)
  and the batch's ``before_read`` hooks run for every (layer, plane) the step reads; the step
  reads the pool only through its gathers, and nothing writes those pages meanwhile (the engine
  lock is held; load-back writers only target LOADING pages, whose fences the guard waited for).
- Writes: the step never writes the pool. The new tokens' plane rows come back and are stored
  at the tokens' own rows (pages this step is the registered writer of) right after it, before
  commit acks the write.

Quantized weights (--quant int8 / int4 on the CPU: runtime/weights/quant_cpu.py's packed
objects, routed experts as [E, ...] stacks) are traced like any weight: their tensors are inputs
(never frozen), their calls are torch's packed weight-only kernels, and the routed experts are
indexed by ids read inside the graph (decode_step.routed_packed_decode). The library key carries
a digest of the weight layout, so another --quant of the same checkpoint compiles its own.

Eligible: CPU model with plain or packed CPU weights (``base.graph_safe``: no offloaded experts,
no bitsandbytes / portable int4 weights), not on the Triton interpreter, every sequence decoding
one token, last-token logits. Anything else runs the eager forward. EngineConfig.cpu_graph
("auto" | "off") or ``KVSCOPE_CPU_GRAPH=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from runtime.compile_log import THREAD_NAME, failure_log, log_detail, quiet_torch_logs, verbose
from runtime.kv.pool import KVPool
from runtime.models.base import graph_safe
from runtime.models.batch import ForwardBatch
from runtime.models.decode_step import decode_step, mtp_step, stored_layers, verify_step
from runtime.models.rope import RotaryTables
from runtime.models.steps import Reads, read_every_plane

if TYPE_CHECKING:
    from runtime.models.base import CausalLM

# Models whose weights fit this many bytes are compiled with the weights frozen in (a copy per
# bucket, prepacked for Inductor's C++ GEMMs); larger ones take the weights as inputs.
FROZEN_MAX_BYTES = int(os.environ.get("KVSCOPE_CPU_GRAPH_FROZEN_MAX", 256 << 20))
FROZEN = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# emulate_precision_casts: fused bf16 elementwise code rounds each op's result to bf16 as eager
# torch does (not one rounding per fused loop), so bf16 greedy tokens match the eager path's
# (without it a tiny bf16 int8 model diverged from eager after 8 tokens).
QUIET = {
    "emulate_precision_casts": True,
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}
# Deprecation notices torch's own export / autotune code raises while compiling a bucket in the
# background; they say nothing about kvscope and would land in the middle of a TUI or a report.
warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning
)
MIN_COLUMNS = 64  # context columns: the next power of two >= max(end, MIN_COLUMNS)
BATCH_BUCKETS = (1, 4, 8, 16, 32, 64, 128)  # few buckets: each compiles for ~1 min


# ---- process-wide compile discipline --------------------------------------------------------
_COMPILE_LOCK = threading.Lock()  # one compile at a time in this process, whatever engine asks
_GRAPHS: weakref.WeakSet = weakref.WeakSet()  # every CpuDecodeGraph of this process
_ABANDONED = threading.Event()  # set at shutdown: no compile starts any more


class CompileAbandoned(BaseException):
    """Raised inside a compile thread at shutdown. A BaseException, so that torch's own
    ``except Exception`` handlers do not swallow it."""


def abandon_compiles(timeout: float = 5.0) -> bool:
    """Stop every compile thread of this process within ``timeout`` seconds: queued buckets
    are dropped, the compile in flight is interrupted at its next Python bytecode (the bucket
    stays eager; nothing half-built is kept). True when no compile thread is left."""
    _ABANDONED.set()
    threads = []
    for graph in list(_GRAPHS):
        graph.close()
        th = graph._worker
        if th is not None and th.is_alive():
            threads.append(th)
            if graph._compiling and th.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(th.ident), ctypes.py_object(CompileAbandoned)
                )
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    return not any(th.is_alive() for th in threads)


def compiles_running() -> bool:
    return any(g._worker is not None and g._worker.is_alive() for g in list(_GRAPHS))


# Runs before the interpreter joins its non-daemon threads at exit (concurrent.futures uses the
# same hook): a program that never closed its engine still ends without a compile in flight.
threading._register_atexit(abandon_compiles)


def cpu_graph_requested(setting: str = "auto") -> bool:
    """``setting`` is EngineConfig.cpu_graph (auto | off); KVSCOPE_CPU_GRAPH=0 overrides."""
    return os.environ.get("KVSCOPE_CPU_GRAPH", "1") != "0" and setting != "off"


def bucket_of(batch: int, max_end: int) -> tuple[int, int] | None:
    """(padded batch, context columns) of a decode step, or None when the batch is too large."""
    bb = next((x for x in BATCH_BUCKETS if x >= batch), None)
    if bb is None:
        return None
    return bb, max(MIN_COLUMNS, 1 << (max_end - 1).bit_length())


def spec_bucket(kind: str, batch: int, n: int, max_end: int) -> tuple | None:
    """The bucket of a speculative step: ``kind`` "verify" (the main model over n tokens per
    sequence, hidden states kept) or "mtp" (the MTP layer over n rows per sequence) ->
    (padded batch, context columns, kind, n), or None when the batch is too large."""
    b = bucket_of(batch, max_end)
    return None if b is None else (*b, kind, n)


def _container(v) -> bool:
    """Objects of the model tree that may hold weights: lists (of layers), our mutable
    dataclasses (layers, attention, MoE, ...), the RoPE tables and packed quantized weights
    (their tensors become inputs of the compiled step like any weight). Frozen configs are
    shared."""
    if isinstance(v, list | RotaryTables) or getattr(type(v), "graph_safe", False):
        return True  # graph_safe: packed CPU weight objects (runtime/weights/quant_cpu.py)
    return (
        dataclasses.is_dataclass(v)
        and not isinstance(v, type)
        and not v.__dataclass_params__.frozen
    )


def _skeleton(model: CausalLM) -> tuple[object, list[torch.Tensor], list[tuple]]:
    """A private copy of the model's object tree (containers copied, tensors shared) and its
    weights: (skeleton, weights [W], slots [(container, attribute, weight index)]). Export
    traces decode_step over the skeleton with each slot bound to a graph input, so the weights
    are inputs of the compiled step (not constants copied into it) and the live model, which
    the stepping thread keeps using meanwhile, is never touched."""
    weights: list[torch.Tensor] = []
    index: dict[int, int] = {}
    slots: list[tuple] = []
    copies: dict[int, object] = {}

    def clone(obj):
        if id(obj) in copies:
            return copies[id(obj)]
        if isinstance(obj, list):
            out = copies[id(obj)] = [clone(x) for x in obj]
            return out
        out = copies[id(obj)] = copy.copy(obj)
        names = (
            [f.name for f in dataclasses.fields(obj)]
            if dataclasses.is_dataclass(obj)
            else list(vars(obj))
        )
        for name in names:
            v = getattr(obj, name)
            if isinstance(v, torch.Tensor):
                i = index.setdefault(id(v), len(weights))
                if i == len(weights):
                    weights.append(v)
                slots.append((out, name, i))
            elif _container(v):
                setattr(out, name, clone(v))
        return out

    return clone(model), weights, slots


class _DecodeModule(torch.nn.Module):
    """decode_step with flat tensor inputs and outputs, for torch.export:
    (input_ids, positions, ctx_rows, *planes in ``plane_names`` order, *weights) ->
    (logits, *new rows in ``row_names`` order). Without ``bind_weights`` there are no weight
    inputs: the live model's tensors are traced as constants (read only)."""

    def __init__(
        self,
        model: CausalLM,
        plane_names,
        row_names,
        bind_weights: bool = True,
        kind: str = "decode",
        n: int = 1,
    ):
        """``kind``: "decode" (decode_step), "verify" (verify_step, n tokens per sequence,
        outputs (logits, hidden, *rows)) or "mtp" (mtp_step: one more input, the previous
        hidden states, after ctx_rows; outputs (logits, out, *rows))."""
        super().__init__()
        self.model, self.bind_weights, self.kind, self.n = model, bind_weights, kind, n
        self.skeleton, self.weights, self.slots = _skeleton(model)
        self.plane_names, self.row_names = plane_names, row_names

    def _call(self, model, input_ids, positions, ctx_rows, prev, planes):
        if self.kind == "decode":
            logits, rows = decode_step(model, input_ids, positions, ctx_rows, planes)
            return (logits, *[rows[r] for r in self.row_names])
        if self.kind == "verify":
            out = verify_step(model, input_ids, positions, ctx_rows, planes, self.n)
        else:
            out = mtp_step(model, input_ids, positions, prev, ctx_rows, planes, self.n)
        return (out[0], out[1], *[out[2][r] for r in self.row_names])

    def forward(self, input_ids, positions, ctx_rows, *rest):
        prev = None
        if self.kind == "mtp":
            prev, rest = rest[0], rest[1:]
        n = len(self.plane_names)
        planes = dict(zip(self.plane_names, rest[:n], strict=True))
        if not self.bind_weights:  # frozen: the weights are read as constants
            return self._call(self.model, input_ids, positions, ctx_rows, prev, planes)
        weights = rest[n:]
        for obj, name, i in self.slots:  # bind the skeleton to this call's weight inputs
            setattr(obj, name, weights[i])
        try:
            return self._call(self.skeleton, input_ids, positions, ctx_rows, prev, planes)
        finally:
            for obj, name, i in self.slots:
                setattr(obj, name, self.weights[i])


# Loaded libraries of this process: (CpuDecodeGraph key, bucket) -> _CompiledStep. Engines of
# the same model and pool shape (chaos runs, benchmarks, tests) compile each bucket once.
_LIBRARIES: dict[tuple, _CompiledStep] = {}


def _values_digest(weights: list[torch.Tensor]) -> tuple:
    """Identifies weight values (two float64 sums per tensor): two checkpoints that share a
    fingerprint but not their values never share a frozen library."""
    return tuple(
        (tuple(w.shape), float(w.double().sum()), float(w.double().abs().sum())) for w in weights
    )


def _format_digest(slots: list[tuple], weights: list[torch.Tensor]) -> str:
    """Digest of the weight layout a library was traced over: per slot the owning object's
    type, the attribute, the tensor's shape, dtype and strides (bf16 vs int8 vs int4 tiles,
    stacked experts vs per-expert lists, padded K, ...)."""
    h = hashlib.sha256()
    for obj, name, i in slots:
        w = weights[i]
        h.update(f"{type(obj).__qualname__}.{name}:{i}:{tuple(w.shape)}:{w.dtype}:".encode())
        h.update(f"{w.stride()};".encode())
    return h.hexdigest()[:24]


# ---- libraries kept across runs -------------------------------------------------------------
# A library over weight inputs depends on the model's structure (config, weight layout: the
# engine's model key + _format_digest), the bucket and pool shapes, kvscope's traced code, torch
# and the CPU it was compiled for; never on the weights' values. All of that names its file.


def library_dir() -> Path | None:
    """$XDG_CACHE_HOME/kvscope/cpu_graph (KVSCOPE_CPU_GRAPH_CACHE=0: no cross-run cache)."""
    if os.environ.get("KVSCOPE_CPU_GRAPH_CACHE", "1") == "0":
        return None
    return failure_log().parent / "cpu_graph"


@functools.cache
def code_digest() -> str:
    """kvscope's runtime/ and kernels/ sources, torch's version and build, the CPU (its model
    and the vector ISA Inductor compiles for) and the compile options."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for sub in ("runtime", "kernels"):
        for f in sorted((root / sub).rglob("*.py")):
            h.update(f"{f.relative_to(root)}:".encode() + f.read_bytes())
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    h.update(f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{cpu}".encode())
    h.update(repr((sorted(QUIET.items()), sorted(FROZEN.items()))).encode())
    return h.hexdigest()[:16]


def _load_cached(path: Path | None):
    """The AOTI runner of a library kept on disk, or None (absent or unreadable: recompile)."""
    if path is None or not path.is_file():
        return None
    import torch._inductor as inductor

    try:
        return inductor.aoti_load_package(str(path))
    except Exception:  # truncated or from an incompatible build: drop it
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def _store_cached(src: str, path: Path | None) -> None:
    """Copy a fresh library into the cross-run cache (atomically: readers never see half)."""
    if path is None:
        return
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)


class _CompiledStep:
    """One bucket's AOTInductor-compiled step. Called as ready steps are (step, input_ids,
    positions, ctx_rows, planes) -> (logits, rows by name); ``step`` is unused. Runs the loaded
    C++ model directly (no guards, no Python wrapper per kernel); the model's weight tensors are
    passed as inputs on every call (nothing is copied)."""

    package_bytes = 0  # size of the compiled package (the .so with any embedded constants)

    def __init__(
        self, runner, plane_names: list[str], row_names: list[str], weights, kind="decode"
    ):
        self.runner, self.loader = runner, runner.loader  # the runner keeps the library loaded
        self.plane_names, self.row_names, self.weights = plane_names, row_names, weights
        self.kind = kind

    def with_weights(self, weights) -> _CompiledStep:
        """The same library called with another engine's weights (frozen: none)."""
        return _CompiledStep(self.runner, self.plane_names, self.row_names, weights, self.kind)

    def __call__(self, step, input_ids, positions, ctx_rows, planes, *prev):
        """decode: (logits, rows by name); verify / mtp: (logits, hidden, rows by name)."""
        out = self.loader.boxed_run(
            [
                input_ids,
                positions,
                ctx_rows,
                *prev,
                *[planes[n] for n in self.plane_names],
                *self.weights,
            ]
        )
        if self.kind == "decode":
            return out[0], dict(zip(self.row_names, out[1:], strict=True))
        return out[0], out[1], dict(zip(self.row_names, out[2:], strict=True))


class CpuDecodeGraph:
    """Runs eligible decode steps through AOTInductor-compiled ``decode_step``, one per bucket."""

    def __init__(self, model: CausalLM, pool: KVPool, model_key: str = ""):
        """``model_key`` names the checkpoint and dtype (the engine passes the KV fingerprint):
        with it, a library compiled by another engine of this process for the same model and
        pool shape is reused instead of compiled again."""
        self.model, self.pool = model, pool
        self.enabled = model.device.type == "cpu" and graph_safe(model)
        # the speculative steps (verify, MTP) too: the MTP layer's weights plain as well
        self.spec_enabled = self.enabled and bool(model.mtp) and graph_safe(model, mtp=True)
        self.failed: str | None = None
        self.steps_compiled = 0  # decode steps served by a compiled bucket
        self.steps_eager = 0  # eligible decode steps that ran eagerly (bucket still compiling)
        self.buckets_from_disk = 0  # buckets loaded from the cross-run cache (library_dir())
        self._stored = stored_layers(model)
        self._planes = {n: t.flatten(1, 2) for n, t in pool.planes.items()}  # [L, rows, *tail]
        _, weights, slots = _skeleton(model) if self.enabled else (None, [], [])
        # Packed quantized weights are never frozen in (Inductor would fold and copy them):
        # their tensors are always inputs, so the library holds no copy of them.
        packed = any(getattr(type(obj), "graph_safe", False) for obj, _, _ in slots)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        self.frozen = not packed and nbytes <= FROZEN_MAX_BYTES
        self._weights = [] if self.frozen else weights
        shapes = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in self._planes.items())
        # A frozen library holds the weights' values: the key carries a digest of them.
        values = _values_digest(weights) if self.frozen and model_key else ()
        # The engine's model_key names checkpoint, dtype and page size, not the weight format
        # (--quant): the key also carries every weight slot's owner type, name, shape and dtype,
        # so a model loaded in another format (or repacked differently) never reuses a library.
        fmt = _format_digest(slots, weights)
        self._key = (model_key, fmt, self.frozen, shapes, values) if model_key else None
        self._layer_ids = {n: torch.tensor(ls, dtype=torch.long) for n, ls in self._stored.items()}
        # Rows per sequence of the speculative buckets worth compiling (ModelRunner.speculate):
        # kind -> {n}; other shapes (a request's last steps) run eagerly.
        self.spec_rows: dict[str, set[int]] = {}
        self._mtp_stored = stored_layers(model, mtp=True) if model.mtp else {}
        self._mtp_ids = {
            n: torch.tensor(ls, dtype=torch.long) for n, ls in self._mtp_stored.items()
        }
        self._ready: dict[tuple[int, int], object] = {}  # bucket -> compiled callable
        self._queue: list[tuple[int, int]] = []
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._compiling = False  # the worker is compiling self._queue[0]
        _GRAPHS.add(self)

    # ---- compilation (background thread) -----------------------------------------------------
    def _compile(self, bucket: tuple[int, int]):
        """Export decode_step at this bucket's shapes, compile it with AOTInductor, load it, and
        run it once on a null step (padding everywhere).

        Frozen (the model's weights <= FROZEN_MAX_BYTES): the weights are constants of the
        library, so Inductor prepacks them and autotunes its own C++ GEMM micro-kernels for
        them (~3-5x faster than MKL's M=1 GEMMs here); each bucket then holds a copy of the
        weights. Larger models pass the weights as inputs (no copy, ATen GEMMs)."""
        import torch._inductor as inductor

        bb, cols = bucket[:2]
        kind, n = bucket[2:] if len(bucket) > 2 else ("decode", 1)
        plane_names = list(self._planes)
        row_names = list(self._mtp_stored if kind == "mtp" else self._stored)
        module = _DecodeModule(self.model, plane_names, row_names, not self.frozen, kind=kind, n=n)
        ids = torch.zeros(bb * n, dtype=torch.long)
        pos = torch.arange(bb * n, dtype=torch.long) % n  # padding sequences: positions 0..n-1
        ctx_rows = torch.zeros((bb * n, cols), dtype=torch.long)
        prev = [torch.zeros((bb * n, self.model.cfg.hidden_size), dtype=self.model.dtype)]
        prev = prev if kind == "mtp" else []
        weights = [] if self.frozen else module.weights
        args = (ids, pos, ctx_rows, *prev, *[self._planes[n] for n in plane_names], *weights)
        disk = self._disk_path(bucket)
        runner = _load_cached(disk)
        if runner is not None:
            package_bytes, self.buckets_from_disk = disk.stat().st_size, self.buckets_from_disk + 1
        else:
            with torch.no_grad():
                program = torch.export.export(module, args)
            opts = dict(QUIET)
            if self.frozen:
                opts.update(FROZEN)
            with tempfile.TemporaryDirectory(prefix="kvscope-cpu-graph-") as tmp:
                path = str(Path(tmp) / f"{kind}{n}_b{bb}_c{cols}.pt2")
                with inductor.config.patch(opts):
                    inductor.aoti_compile_and_package(program, package_path=path)
                runner = inductor.aoti_load_package(path)
                package_bytes = os.path.getsize(path)  # code + whatever constants it embeds
                _store_cached(path, disk)
        fn = _CompiledStep(runner, plane_names, row_names, weights, kind)
        fn.package_bytes = package_bytes
        with torch.inference_mode():
            fn(None, ids, pos, ctx_rows, self._planes, *prev)
        return fn

    def _disk_path(self, bucket: tuple) -> Path | None:
        """Where this bucket's library is kept across runs, or None (no model key; frozen
        libraries, which hold the weights, are not written to disk)."""
        root = library_dir()
        if root is None or self._key is None or self.frozen:
            return None
        name = hashlib.sha256(repr((self._key, bucket, code_digest())).encode()).hexdigest()
        kind = f"{bucket[2]}{bucket[3]}" if len(bucket) > 2 else "decode"
        return root / f"{kind}_b{bucket[0]}_c{bucket[1]}_{name[:32]}.pt2"

    def _step(self, input_ids, positions, ctx_rows, planes):
        return decode_step(self.model, input_ids, positions, ctx_rows, planes)

    def _step_of(self, kind: str, n: int):
        """The uncompiled tensor function of a speculative bucket (same outputs)."""
        if kind == "verify":
            return lambda ids, pos, ctx, planes: verify_step(self.model, ids, pos, ctx, planes, n)
        return lambda ids, pos, ctx, planes, prev: mtp_step(
            self.model, ids, pos, prev, ctx, planes, n
        )

    def _work(self) -> None:
        try:
            self._work_loop()
        except CompileAbandoned:  # arrived outside the compile proper (shutdown race)
            self._drop_queue()

    def _work_loop(self) -> None:
        torch.set_num_threads(1)  # compile beside the stepping thread, not against it
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:  # close(): the thread ends and lets go of the model
                    return
                bucket = self._queue[0]  # stays queued while compiling (wait_idle waits on it)
            while not _COMPILE_LOCK.acquire(timeout=0.1):  # another engine is compiling
                if self._closed or _ABANDONED.is_set():
                    return self._drop_queue()
            try:
                with self._cv:
                    if self._closed or _ABANDONED.is_set():
                        return self._drop_queue()
                    self._compiling = True
                quiet_torch_logs()
                fn = self._compile(bucket)
            except CompileAbandoned:  # shutdown: the bucket stays eager, nothing is kept
                return self._drop_queue()
            except Exception as exc:  # no C++ compiler, an unsupported op: stay eager
                self._report_failure(bucket, exc)
                return self._drop_queue(failed=repr(exc))
            finally:
                _COMPILE_LOCK.release()
            with self._cv:
                if self._key is not None and isinstance(fn, _CompiledStep):
                    _LIBRARIES[(self._key, bucket)] = fn.with_weights([])  # holds no weights
                if not self._closed:
                    self._ready[bucket] = fn
                self._queue.pop(0)
                self._compiling = False
                self._cv.notify_all()

    def _drop_queue(self, failed: str | None = None) -> None:
        with self._cv:
            if failed is not None:
                self.enabled, self.failed = False, failed
            self._compiling = False
            self._queue.clear()
            self._cv.notify_all()

    @staticmethod
    def _report_failure(bucket: tuple[int, int], exc: Exception) -> None:
        """One line on stderr; the traceback in failure_log() (and on stderr if VERBOSE)."""
        detail = "".join(traceback.format_exception(exc))
        where = log_detail(f"bucket batch {bucket[0]}, {bucket[1]} columns\n{detail}")
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        if verbose():
            sys.stderr.write(detail)
        sys.stderr.write(
            f"kvscope: CPU decode graph: compiling bucket (batch {bucket[0]}, {bucket[1]} "
            f"columns) failed ({type(exc).__name__}: {first}); decode stays eager; "
            f"traceback in {where}\n"
        )
        sys.stderr.flush()

    def close(self) -> None:
        """Stop the compile thread and drop the compiled steps, so that a closed engine's model
        and pool can be freed. A bucket being compiled still lands in the process cache (for
        the next engine of the same model); wait_idle() waits for it."""
        with self._cv:
            self._closed = True
            del self._queue[1 if self._compiling else 0 :]  # the one compiling still lands
            self._ready.clear()
            self._cv.notify_all()

    def request(self, bucket: tuple[int, int]) -> None:
        """Queue a bucket for compilation (no-op if ready or queued)."""
        with self._cv:
            if self._closed or not self.enabled or bucket in self._ready or bucket in self._queue:
                return
            shared = _LIBRARIES.get((self._key, bucket)) if self._key is not None else None
            if shared is not None:  # compiled by another engine of this process
                self._ready[bucket] = shared.with_weights(self._weights)
                self._cv.notify_all()
                return
            if _ABANDONED.is_set():
                return
            self._queue.append(bucket)
            if self._worker is None:
                # Not a daemon: the interpreter never finalizes under a compile (see the top).
                self._worker = threading.Thread(target=self._work, name=THREAD_NAME)
                self._worker.start()
            self._cv.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued bucket is compiled (or compiling failed); True if idle."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue, timeout)

    def warm(self, run_workload, rounds: int = 4, timeout: float = 1800) -> bool:
        """Run ``run_workload()`` (some decode work on this graph's engine) until none of its
        decode steps runs eagerly: each round compiles the buckets the previous one asked for.
        For benchmarks, before anything is timed. False if a compile took over ``timeout``."""
        for _ in range(rounds):
            before = self.steps_eager
            run_workload()
            if not self.wait_idle(timeout):
                return False
            if self.steps_eager == before or self.failed:
                break
        return True

    @property
    def buckets_ready(self) -> list[tuple[int, int]]:
        with self._cv:  # the compile thread inserts into _ready
            return sorted(self._ready)

    # ---- one step ----------------------------------------------------------------------------
    @staticmethod
    def fits(batch: ForwardBatch) -> bool:
        return bool(batch.seqs) and all(
            s.n == 1 and s.offset == b for b, s in enumerate(batch.seqs)
        )

    def _compiled(self, bucket):
        """The bucket's compiled step, or None: no bucket fits (too large a batch), or it is
        not compiled yet (queued; this step runs eagerly)."""
        if bucket is None:
            return None
        fn = self._ready.get(bucket)
        if fn is None:
            self.request(bucket)
            self.steps_eager += 1
        return fn

    def run_spec(self, kind: str, batch: ForwardBatch, pool: KVPool, prev=None):
        """A speculative step through its compiled bucket, or None (run it eagerly; the
        bucket is queued). ``kind`` "verify": the main model over n tokens per sequence ->
        (logits [B*n, V], final-norm hidden [B*n, D]); "mtp": the MTP layer over n rows per
        sequence, ``prev`` [B*n, D] its previous hidden states -> (logits, outputs). Rows of
        sequence b are b*n .. b*n + n - 1; an MTP row whose ``new_rows`` is -1 is not stored."""
        if not self.spec_enabled or pool is not self.pool or not batch.seqs:
            return None
        n = batch.seqs[0].n
        if n not in self.spec_rows.get(kind, ()):
            return None
        if any(s.n != n or s.offset != b * n for b, s in enumerate(batch.seqs)):
            return None
        if kind == "verify" and batch.has_unstored:
            return None
        b, end = len(batch.seqs), max(s.end for s in batch.seqs)
        bucket = spec_bucket(kind, b, n, end)
        fn = self._compiled(bucket)
        if fn is None:
            return None
        bb, cols = bucket[:2]
        ctx_rows = torch.zeros((bb * n, cols), dtype=torch.long)
        for i, s in enumerate(batch.seqs):
            ctx_rows[i * n : (i + 1) * n, : s.end] = s.ctx_rows
        ids = torch.zeros(bb * n, dtype=torch.long)
        pos = torch.arange(bb * n, dtype=torch.long) % n  # padding: positions 0..n-1
        ids[: b * n] = batch.input_ids
        pos[: b * n] = batch.positions
        reads = Reads(pool, batch)
        extra = []
        if kind == "verify":
            read_every_plane(self.model, reads, end)
        else:
            mtp = self.model.mtp[0]
            for plane in mtp.block.attn.read_planes(end):
                reads(mtp.layer, plane)
            pv = torch.zeros((bb * n, prev.shape[-1]), dtype=prev.dtype)
            pv[: b * n] = prev
            extra = [pv]
        with torch.inference_mode():
            logits, aux, new_rows = fn(
                self._step_of(kind, n), ids, pos, ctx_rows, self._planes, *extra
            )
        layer_ids = self._mtp_ids if kind == "mtp" else self._layer_ids
        keep = (batch.new_rows >= 0).nonzero().flatten()
        for name, rows in new_rows.items():  # the new rows, into their own pages
            vals = rows[:, : b * n][:, keep]
            pool.store_layers(name, layer_ids[name], batch.new_rows[keep], vals)
        self.steps_compiled += 1
        return logits[: b * n], aux[: b * n]

    def run(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor | None:
        """Logits [B, V] of a decode step through its compiled bucket, or None (run eagerly;
        the bucket is queued for compilation)."""
        if not self.enabled or pool is not self.pool or not self.fits(batch):
            return None
        b = len(batch.seqs)
        end = max(s.end for s in batch.seqs)
        bucket = bucket_of(b, end)
        fn = self._compiled(bucket)
        if fn is None:
            return None
        bb, cols = bucket
        ctx_rows = torch.zeros((bb, cols), dtype=torch.long)
        for i, s in enumerate(batch.seqs):
            ctx_rows[i, : s.end] = s.ctx_rows
        ids = torch.zeros(bb, dtype=torch.long)
        pos = torch.zeros(bb, dtype=torch.long)
        ids[:b] = batch.input_ids
        pos[:b] = batch.positions
        read_every_plane(self.model, Reads(pool, batch), end)  # every plane the step reads
        with torch.inference_mode():
            logits, new_rows = fn(self._step, ids, pos, ctx_rows, self._planes)
        for name, rows in new_rows.items():  # the new tokens' rows, into their own pages
            pool.store_layers(name, self._layer_ids[name], batch.new_rows, rows[:, :b])
        self.steps_compiled += 1
        return logits[:b]


__all__ = [
    "CpuDecodeGraph",
    "cpu_graph_requested",
    "bucket_of",
    "spec_bucket",
    "abandon_compiles",
    "compiles_running",
    "failure_log",
    "BATCH_BUCKETS",
    "MIN_COLUMNS",
]
