"""Which implementation runs an op, and how a Triton kernel is launched.

Rules (read at every call, so tests can flip them with an env var):

- CUDA tensors run the Triton kernels.
- CPU tensors run the plain-torch references, unless ``KVSCOPE_TRITON_INTERPRET=1`` is set; then
  they run the Triton kernels through Triton's interpreter (slow; for tests and debugging).

The Triton wrappers (``kernels.<op>.<op>``) can always be called directly: on CPU tensors they use
the interpreter, whatever the env var says. The interpreter is normally switched on by
``TRITON_INTERPRET=1`` before ``triton`` is imported (``kernels/__init__.py`` and
``tests/kernels/conftest.py`` do that). When triton was imported earlier without it (in one
pytest process, bitsandbytes imports triton while other test directories are collected),
``launch`` interprets the kernel anyway and swaps in interpreted versions of the @jit helpers it
calls (triton.language's own ``tl.sum``, ``tl.max`` ... and those of the kernel's module) for the
duration of the launch.

Interpreter deviations met here (triton 3.9), besides bf16 ``tl.dot`` (shared/TRAPS.md): fp32 ->
bf16 casts truncate instead of rounding to nearest even (kernels use ``_tl.cast_rne``), and a
scalar bool ``&`` a vector bool makes a mask the interpreter rejects (combine vectors only).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "interpret_requested",
    "use_triton",
    "on_interpreter",
    "gpu_sized",
    "launch",
    "num_splits",
    "dot_precision",
    "compile_only",
]


def interpret_requested() -> bool:
    """True when ``KVSCOPE_TRITON_INTERPRET=1``: CPU tensors take the Triton kernels."""
    return os.environ.get("KVSCOPE_TRITON_INTERPRET") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether ``kernels.ops`` runs the Triton kernel (True) or the torch reference for a device."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret_requested()


def on_interpreter(device: torch.device) -> bool:
    """True when a launch for tensors on ``device`` runs through Triton's interpreter.

    Wrappers pass this as the ``DOT_FP32`` constexpr: under the interpreter ``tl.dot`` on bf16
    operands is wrong (see shared/TRAPS.md), so kernels cast dot operands to fp32 there.
    """
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def gpu_sized(device: torch.device) -> bool:
    """Whether wrappers pick GPU block sizes (CUDA, and "meta" tensors under compile_only) or
    small interpreter-friendly ones (CPU)."""
    return device.type != "cpu"


_lock = threading.Lock()
_interpreted: dict[int, Any] = {}  # id(JITFunction) -> InterpretedFunction of the same python fn


def _as_interpreted(kernel: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    fn = _interpreted.get(id(kernel))
    if fn is None:
        fn = _interpreted[id(kernel)] = InterpretedFunction(kernel.fn)
    return fn


@contextlib.contextmanager
def _jit_helpers_interpreted(kernel: Any) -> Iterator[None]:
    """Make the @jit helpers a kernel calls interpretable while a launch runs.

    Those are triton.language's own (``tl.sum``, ``tl.max`` ...) and the ones defined in the
    kernel's module. A no-op when triton was imported with TRITON_INTERPRET=1 (every @jit
    function is interpreted already).
    """
    import triton.language as tl
    import triton.language.standard as tl_std
    from triton.runtime.jit import JITFunction

    if not isinstance(getattr(tl_std, "sum", None), JITFunction):
        yield
        return
    # Modules that triton imports lazily and that wrap tl's jit helpers at import (gluon, 3.9)
    # must be imported before the swap, or they would see the interpreted ones.
    with contextlib.suppress(ImportError):
        import triton.experimental.gluon  # noqa: F401
    namespaces = [vars(tl), vars(tl_std), getattr(kernel, "fn", kernel).__globals__]
    changes: list[tuple[dict[str, Any], str, Any]] = []
    with _lock:
        try:
            for ns in namespaces:
                for name, val in list(ns.items()):
                    if isinstance(val, JITFunction):
                        changes.append((ns, name, val))
                        ns[name] = _as_interpreted(val)
            yield
        finally:
            for ns, name, val in reversed(changes):
                ns[name] = val


def launch(
    kernel: Any, grid: Sequence[int], device: torch.device, *args: Any, **kwargs: Any
) -> None:
    """Launch a ``@triton.jit`` kernel on ``grid`` for tensors living on ``device``.

    CUDA tensors get the compiled kernel; CPU tensors get the interpreter (see the module doc);
    "meta" tensors inside ``compile_only`` only compile it for that target.
    """
    if device.type == "meta":
        _compile(kernel, args, kwargs)
        return
    grid = tuple(int(g) for g in grid)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        kernel[grid](*args, **kwargs)
        return
    with _jit_helpers_interpreted(kernel):
        _as_interpreted(kernel)[grid](*args, **kwargs)


_SM_COUNT: dict[int, int] = {}


def num_splits(device: torch.device, programs: int, keys: int, min_keys_per_split: int) -> int:
    """How many key splits a flash-decoding launch of ``programs`` (rows x head blocks) should use.

    Aims at ~2 programs per SM on CUDA, never giving a split fewer than ``min_keys_per_split``
    keys; on CPU (interpreter) it keeps the grid small.
    """
    max_splits = max(1, -(-keys // max(min_keys_per_split, 1)))
    if device.type == "cpu":
        return min(2, max_splits)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        sms = _SM_COUNT[idx]
    else:  # meta (compile_only): an H100's count
        sms = 132
    want = -(-2 * sms // max(programs, 1))
    return int(max(1, min(want, max_splits, 64)))


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for tl.dot: exact fp32 ("ieee") for fp32 inputs, else the default.

    bf16/fp16 operands ignore it; fp32 ones would otherwise get tf32 on CUDA.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


# --- compile-only mode: build the GPU binaries of real launches without a GPU ------------------

_TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_compile_target: Any = None
_MAX_SMEM = 227 * 1024  # H100 / H200 per-block shared memory limit
_compiled: list[str] = []


@contextlib.contextmanager
def compile_only(target: Any) -> Iterator[list[str]]:
    """While active, launches on "meta" tensors compile the kernel for ``target`` (a
    ``triton.backends.compiler.GPUTarget``, e.g. ``GPUTarget("cuda", 90, 32)``) down to a cubin
    instead of running it; no GPU needed (ptxas ships with triton). Yields the list of compiled
    kernel names. Needs triton imported without TRITON_INTERPRET.
    """
    global _compile_target
    prev, _compile_target = _compile_target, target
    _compiled.clear()
    try:
        yield _compiled
    finally:
        _compile_target = prev


def _compile(kernel: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    assert _compile_target is not None, "meta tensors launch only inside backend.compile_only"
    assert isinstance(kernel, JITFunction), "compile_only needs triton without TRITON_INTERPRET"
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for p in kernel.params:
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TRITON_TYPE[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot type argument {p.name}={v!r}")
    src = ASTSource(kernel, signature, constexprs=constexprs)
    compiled = triton.compile(src, target=_compile_target, options=options)
    smem = int(getattr(compiled.metadata, "shared", 0))
    assert smem <= _MAX_SMEM, f"{kernel.__name__}: {smem} bytes of shared memory > {_MAX_SMEM}"
    _compiled.append(f"{kernel.fn.__module__}.{kernel.__name__} (smem {smem // 1024} KiB)")


def cuda_time_per_call(fn, iters: int, warmup: int = 3) -> float:
    """Seconds per call of ``fn`` on the current CUDA stream, timed with CUDA events after
    ``warmup`` untimed calls (compiles, caches)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters
