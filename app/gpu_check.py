"""`kvscope gpu-check` (`make gpu-check`): every GPU-side claim checked and timed in minutes.

    kvscope gpu-check [--wheels DIR] [--no-install] [--only SECTION ...] [--limit NAME=SECONDS]
    kvscope gpu-check --rehearse           # the same sections on the CPU at toy sizes (seconds)
    kvscope gpu-check --compile 90         # compile every Triton kernel for sm_90, run nothing

First a preflight (app/gpu_preflight.py: missing packages, installed from the registry or a wheel
folder), then the sections of app/gpu_sections.py in order, each in its own process under its own
time limit: a section that overruns is killed, recorded as timed out, and the next one runs.
After every section the JSON file (docs/gpu-check.json) is rewritten atomically with every
finished section and the targets measured so far, so a run cut off anywhere keeps what it had.
The limits add up to 8 minutes on an H100, compiles included. This module imports no torch until
the preflight has run (`python -m app.gpu_check` works where torch is still to be installed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app import gpu_preflight

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("kernels", "mini", "hicache", "integrity", "offload")  # = gpu_sections.SECTIONS
TITLES = {
    "kernels": "every kernel vs torch; tiny models end to end (CUDA graphs and eager)",
    "mini": 'kvscope vs transformers static cache + torch.compile on "mini"',
    "hicache": "TTFT with the prefix in L2 / L3 vs recompute, integrity on",
    "integrity": "decode with default integrity checks vs checks off",
    "offload": "experts in pinned host memory, 25 % GPU cache; accelerate; int4 / nf4 / FP8",
}
LIMITS_S = {"kernels": 100, "mini": 190, "hicache": 50, "integrity": 45, "offload": 95}
REHEARSAL_LIMIT_S = 120  # per section on the CPU

# (name, section, path to the figure, op, threshold, unit): the GPU targets of the issues.
TARGETS = (
    ("decode_b1_tok_s", "mini", ("kvscope", "decode_b1_tok_s"), ">=", 1000.0, "tok/s"),
    ("decode_b8_tok_s", "mini", ("kvscope", "decode_b8_tok_s"), ">=", 4000.0, "tok/s"),
    ("prefill_vs_transformers", "mini", ("ratios", "prefill"), ">=", 3.0, "x"),
    ("l2_ttft_speedup", "hicache", ("speedup", "L2"), ">=", 10.0, "x"),
    ("l3_ttft_speedup", "hicache", ("speedup", "L3"), ">=", 3.0, "x"),
    ("integrity_overhead", "integrity", ("overhead", "worst"), "<=", 0.05, "fraction"),
    ("offload_decode_tok_s", "offload", ("kvscope", "unquantized", "decode_tok_s"), ">=", 60.0,
     "tok/s"),
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (as app/cli.py)
        sys.stderr.write(f"kvscope gpu-check: error: {message} (see kvscope gpu-check -h)\n")
        raise SystemExit(2)


def add_gpu_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rehearse", action="store_true", help="run every section on the CPU, toy")
    p.add_argument("--json", metavar="FILE", help="results (default docs/gpu-check.json, "
                   "rehearsal: docs/gpu-check-rehearsal.json)")  # fmt: skip
    p.add_argument("--wheels", metavar="DIR", help="install missing packages from this folder")
    p.add_argument("--no-install", action="store_true", help="report missing packages only")
    p.add_argument("--only", nargs="+", metavar="SECTION", help=f"of {', '.join(SECTIONS)}")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=SECONDS",
                   help="override a section's time limit")  # fmt: skip
    p.add_argument("--compile", type=int, metavar="CC",
                   help="only compile every Triton kernel for sm_CC (e.g. 90); no GPU")  # fmt: skip
    p.add_argument("--kernels", nargs="+", metavar="GROUP", help="with --compile: these groups")


def _limits(args) -> dict[str, float]:
    base = dict.fromkeys(SECTIONS, REHEARSAL_LIMIT_S) if args.rehearse else dict(LIMITS_S)
    for spec in args.limit:
        name, _, sec = spec.partition("=")
        try:
            value = float(sec)
        except ValueError:
            value = -1.0
        if name not in base or value <= 0:
            raise SystemExit(_fail(f"--limit {spec}: use NAME=SECONDS with NAME of "
                                   f"{', '.join(SECTIONS)} and SECONDS > 0"))  # fmt: skip
        base[name] = value
    return base


def _fail(msg: str) -> int:
    sys.stderr.write(f"kvscope gpu-check: error: {msg}\n")
    return 2


def _dig(d: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def evaluate_targets(sections: list[dict]) -> dict:
    """Each target: value, threshold, ratio (value / threshold), met, or why it has no value."""
    by = {s["name"]: s for s in sections}
    out = {}
    for name, sec, path, op, thr, unit in TARGETS:
        row: dict = {"section": sec, "target": f"{op} {thr:g} {unit}"}
        s = by.get(sec)
        v = _dig(s["figures"], path) if s else None
        if not isinstance(v, int | float):
            row.update(
                met=None, why="section not run" if s is None else f"no figure ({s['status']})"
            )
        else:
            row.update(value=v, threshold=thr, ratio=v / thr)
            row["met"] = v >= thr if op == ">=" else v <= thr
        out[name] = row
    return out


def _run_dir(rehearse: bool) -> str:
    """Per-run scratch (the mini checkpoint, ~13 GB): /dev/shm when it has room, else tmp."""
    base = None
    if not rehearse and os.path.isdir("/dev/shm"):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 40 << 30:
            base = "/dev/shm"
    return tempfile.mkdtemp(prefix="kvscope-gpu-check-", dir=base)


def run_section(name: str, run_dir: str, limit: float, rehearse: bool) -> dict:
    """One section in its own process group; killed at ``limit`` seconds."""
    part = Path(run_dir) / f"{name}.part.json"
    cmd = [sys.executable, "-m", "app.gpu_sections", name, run_dir, str(part)]
    env = dict(os.environ)
    if rehearse:
        cmd.append("--rehearse")
        env.setdefault("KVSCOPE_CPU_GRAPH", "0")
        if name == "kernels":
            env["TRITON_INTERPRET"] = "1"  # before triton is imported in the worker
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    status = None
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = "timed_out"
    elapsed = time.perf_counter() - t0
    try:
        part_data = json.loads(part.read_text())
    except (OSError, ValueError):
        part_data = {"status": "failed", "figures": {}, "error": "no results written"}
    if status is None:
        status = part_data.get("status", "failed")
        if status == "running" or (proc.returncode != 0 and status == "ok"):
            status = "failed"
            part_data.setdefault("error", f"worker exited with {proc.returncode}")
    out = {
        "name": name,
        "title": TITLES[name],
        "status": status,
        "elapsed_s": round(elapsed, 2),
        "limit_s": limit,
        "figures": part_data.get("figures", {}),
    }
    if part_data.get("error"):
        out["error"] = part_data["error"]
    return out


def cmd_gpu_check(args, argv: list[str] | None = None) -> int:
    if args.compile:
        from app.gpu_kernels import compile_check

        return compile_check(args.compile, args.kernels)
    if args.kernels:
        return _fail("--kernels goes with --compile CC")
    unknown = sorted(set(args.only or []) - set(SECTIONS))
    if unknown:
        return _fail(f"--only {' '.join(unknown)}: unknown section; choose {', '.join(SECTIONS)}")
    try:
        limits = _limits(args)
    except SystemExit as e:
        return int(e.code)
    if args.wheels and not Path(args.wheels).is_dir():
        return _fail(f"--wheels {args.wheels}: not a directory")
    t_start = time.perf_counter()
    print(f"[gpu-check] preflight ({'rehearsal on the CPU' if args.rehearse else 'GPU run'})")
    pre = gpu_preflight.preflight(args.wheels, install=not args.no_install)
    print(f"[gpu-check] preflight done in {time.perf_counter() - t_start:.1f}s", flush=True)
    try:
        import torch
    except ImportError:
        return _fail("torch is not importable after the preflight; install it and rerun")
    if not args.rehearse and not torch.cuda.is_available():
        return _fail("no CUDA device here; the CPU rehearsal is `kvscope gpu-check --rehearse` "
                     "(make gpu-check REHEARSE=1)")  # fmt: skip
    from app.gpu_sections import write_atomic

    default = "docs/gpu-check-rehearsal.json" if args.rehearse else "docs/gpu-check.json"
    path = Path(args.json or ROOT / default)
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SECTIONS if not args.only or s in args.only]
    doc: dict = {
        "schema": "kvscope-gpu-check/1",
        "rehearsal": bool(args.rehearse),
        "command": "kvscope gpu-check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": None,
        "versions": {k: pre["found"].get(k) for k in ("torch", "triton", "transformers")},
        "preflight": pre,
        "limits_s": {s: limits[s] for s in chosen},
        "sections": [],
        "targets": evaluate_targets([]),
        "complete": False,
    }
    write_atomic(path, doc)
    run_dir = _run_dir(args.rehearse)
    print(f"[gpu-check] sections {', '.join(chosen)}; limits sum to "
          f"{sum(limits[s] for s in chosen):.0f}s; results -> {path}", flush=True)  # fmt: skip
    try:
        for i, name in enumerate(chosen, 1):
            print(f"[gpu-check] section {i}/{len(chosen)} {name}: {TITLES[name]}", flush=True)
            sec = run_section(name, run_dir, limits[name], args.rehearse)
            doc["sections"].append(sec)
            doc["device"] = doc["device"] or sec["figures"].get("device")
            doc["targets"] = evaluate_targets(doc["sections"])
            write_atomic(path, doc)
            why = f" ({sec['error']})" if sec.get("error") else ""
            print(f"[gpu-check] section {name}: {sec['status']} in {sec['elapsed_s']:.1f}s "
                  f"(limit {limits[name]:.0f}s){why}", flush=True)  # fmt: skip
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    doc["complete"] = True
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write_atomic(path, doc)
    for name, t in doc["targets"].items():
        if t["met"] is None:
            print(f"[gpu-check] target {name} {t['target']}: no value ({t['why']})")
        else:
            print(f"[gpu-check] target {name} {t['target']}: {'met' if t['met'] else 'MISSED'} "
                  f"({t['value']:.4g}, ratio {t['ratio']:.3g})")  # fmt: skip
    print(f"[gpu-check] done in {doc['elapsed_s']:.1f}s; wrote {path}")
    return 0 if all(s["status"] == "ok" for s in doc["sections"]) else 1


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="kvscope gpu-check", description=__doc__.split("\n")[0])
    add_gpu_check_args(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return cmd_gpu_check(args, argv)


if __name__ == "__main__":
    sys.exit(main())
