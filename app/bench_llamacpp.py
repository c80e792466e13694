"""llama.cpp as a peer of `kvscope bench` (`--peers llamacpp`, and in `--peers all`).

llama.cpp's own tools, built by `make llamacpp` from the vendored tree of the pinned
llama-cpp-python sdist into .cache/llamacpp/build/bin (KVSCOPE_LLAMACPP_DIR overrides the
.cache/llamacpp folder):
- the checkpoint is converted by llama.cpp's converter (app/llamacpp_convert.py) into GGUF at the
  precision matching kvscope's: F32 / BF16 for `--quant none` (kvscope's dtype), Q8_0 for int8,
  Q4_0 (llama-quantize from the BF16 file) for int4; cached under ~/.cache/kvscope/gguf by a
  checkpoint fingerprint + type, so a changed checkpoint never reuses a stale file;
- batch 1: llama-bench, prefill of the prompt length (`-p`) and decode of n - 1 tokens after a
  context of the prompt length (`-n`, `-d`), its own warm-up run first;
- batch 8: llama-batched-bench, 8 parallel sequences with their own prompts (`-npl 8`);
- peak memory: each tool process's own peak RSS (its VmHWM, polled while it runs);
- greedy tokens: kvscope-greedy-ids (tools/llamacpp/greedy_ids.cpp, built against the same
  libllama) from the same prompt ids, compared one to one with kvscope's.
Every tool runs with kvscope's thread count (`-t`), in the same interleaved loop as the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from app.bench_figures import LLAMACPP
from app.bench_runners import RunResult
from runtime.errors import KvscopeError

LLAMA_VERSION = "0.3.36"  # llama-cpp-python sdist whose vendored llama.cpp `make llamacpp` builds
REPO = Path(__file__).resolve().parents[1]
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize", "kvscope-greedy-ids")
# kvscope --quant -> GGUF type (none: by kvscope's dtype)
QUANT_TYPES = {"int8": "q8_0", "int4": "q4_0"}
NOT_BUILT = "llama.cpp tools not built in {bin}: run `make llamacpp` (cmake + a C++ compiler)"


@dataclass(frozen=True)
class LlamaCpp:
    bin: Path  # the tools
    src: Path  # the vendored llama.cpp tree (converter, gguf-py)

    def tool(self, name: str) -> str:
        return str(self.bin / name)


def locate() -> LlamaCpp:
    root = Path(os.environ.get("KVSCOPE_LLAMACPP_DIR", REPO / ".cache" / "llamacpp"))
    bin_ = root / "build" / "bin"
    src = root / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
    missing = [t for t in TOOLS if not (bin_ / t).is_file()]
    if missing or not (src / "convert_hf_to_gguf.py").is_file():
        raise KvscopeError(NOT_BUILT.format(bin=bin_))
    return LlamaCpp(bin_, src)


def available() -> tuple[LlamaCpp | None, str | None]:
    try:
        return locate(), None
    except KvscopeError as e:
        return None, str(e)


def gguf_type(quant: str, dtype: torch.dtype) -> str:
    """The GGUF type at the precision kvscope runs with."""
    if quant == "none":
        return "f32" if dtype == torch.float32 else "bf16"
    if quant not in QUANT_TYPES:
        raise KvscopeError(f"--quant {quant}: llama.cpp has no matching type (use int8 or int4)")
    return QUANT_TYPES[quant]


def fingerprint(model_dir: Path) -> str:
    """Config, tokenizer and weight files (name, size, mtime, first and last MiB)."""
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        p = model_dir / name
        h.update(p.read_bytes() if p.is_file() else b"-")
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, st.st_size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:24]


def gguf_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvscope" / "gguf"


def convert_commands(
    lc: LlamaCpp, python: str, model: Path, gtype: str, out: Path, bf16: Path | None = None
) -> list[list[str]]:
    """The commands that write `out` (a GGUF of type gtype) from the HF checkpoint `model`.
    The converter writes f32 / bf16 / q8_0 itself; q4_0 is llama-quantize of the `bf16` GGUF."""
    if gtype in ("f32", "bf16", "q8_0"):
        conv = [python, "-m", "app.llamacpp_convert", str(lc.src), str(model)]
        return [conv + ["--outtype", gtype, "--outfile", str(out)]]
    if gtype == "q4_0" and bf16 is not None:
        return [[lc.tool("llama-quantize"), str(bf16), str(out), "Q4_0"]]
    raise KvscopeError(f"GGUF type {gtype}: not supported here")


def ensure_gguf(lc: LlamaCpp, model: Path, gtype: str, log) -> Path:
    """The cached GGUF of `model` at `gtype`, converted on first use (minutes)."""
    out = gguf_cache() / f"{fingerprint(model)}-{gtype}.gguf"
    if out.is_file():
        return out
    bf16 = ensure_gguf(lc, model, "bf16", log) if gtype == "q4_0" else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".part")  # renamed when complete: never a half file
    for cmd in convert_commands(lc, sys.executable, model, gtype, tmp, bf16):
        log(f"llama.cpp: converting {model} to {gtype.upper()} GGUF")
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)  # a failed conversion leaves no partial GGUF behind
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
            raise KvscopeError(f"llama.cpp conversion to {gtype} failed: {tail[0]}")
    tmp.replace(out)
    return out


# ------------------------------------------------------------------------------ tool output


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench `-o jsonl`: one object per test; returns n_prompt, n_gen, n_depth, tok/s."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        rows.append(
            {
                "n_prompt": int(d["n_prompt"]),
                "n_gen": int(d["n_gen"]),
                "n_depth": int(d.get("n_depth", 0)),
                "n_threads": int(d["n_threads"]),
                "tok_s": float(d["avg_ts"]),
                "stddev_tok_s": float(d["stddev_ts"]),
                "build": f"{d.get('build_commit')} ({d.get('build_number')})",
                "model_type": d.get("model_type"),
                "model_size": int(d.get("model_size", 0)),
            }
        )
    if not rows:
        raise KvscopeError("llama-bench printed no result line")
    return rows


def parse_batched_bench(text: str) -> list[dict]:
    """llama-batched-bench `--output-format jsonl`: one object per (pp, tg, pl)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            d = json.loads(line)
            keys = ("pp", "tg", "pl", "n_kv", "n_threads")
            row = {k: int(d[k]) for k in keys}
            row.update({k: float(d[k]) for k in ("t_pp", "speed_pp", "t_tg", "speed_tg")})
            rows.append(row)
    if not rows:
        raise KvscopeError("llama-batched-bench printed no result line")
    return rows


def _hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_tool(cmd: list[str], timeout: float = 1800) -> tuple[str, int]:
    """Run one tool; returns (stdout, its peak RSS in bytes).

    The peak is the child's own VmHWM, polled every 10 ms while it runs (a high-water mark, so
    only growth in its last 10 ms can be missed). Not wait4's ru_maxrss: Linux folds the
    parent's RSS at fork/exec time into the child's maxrss, which here would report kvscope's
    multi-GB footprint as llama.cpp's."""
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        t0 = time.monotonic()
        while True:
            hwm = _hwm_bytes(p.pid)
            peak = max(peak, hwm or 0)
            if p.poll() is not None:
                break
            if time.monotonic() - t0 > timeout:
                p.kill()
                p.wait()
                break
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise KvscopeError(f"{Path(cmd[0]).name} exited {p.returncode}: {tail[0]}")
    return stdout, peak


class LlamaCppRunner:
    """`run(prompts, n)` like the other runners: batch 1 through llama-bench, batch 8 through
    llama-batched-bench. The tools draw their own prompt tokens (their speed does not depend on
    which ids), of our prompts' length; tokens are compared separately (`greedy`)."""

    name = LLAMACPP

    def __init__(self, lc: LlamaCpp, gguf: Path, threads: int, gtype: str):
        self.lc, self.gguf, self.threads, self.gtype = lc, gguf, threads, gtype
        self.peak_rss = 0
        self.peak_rss_by_tool: dict[str, int] = {}
        self.raw: list[dict] = []  # every parsed tool row, for the JSON
        self.build: str | None = None
        self.retries = 0  # llama-batched-bench runs repeated for a lost result line

    def _tool(self, cmd: list[str]) -> str:
        out, rss = run_tool(cmd)
        name = Path(cmd[0]).name
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_rss_by_tool[name] = max(self.peak_rss_by_tool.get(name, 0), rss)
        return out

    def bench_commands(self, batch: int, plen: int, n: int) -> list[list[str]]:
        m, t = str(self.gguf), str(self.threads)
        if batch == 1:
            b = [self.lc.tool("llama-bench"), "-m", m, "-t", t, "-r", "1", "-o", "jsonl"]
            decode = ["-p", "0", "-n", str(n - 1), "-d", str(plen)]  # after a plen context
            return [b + ["-p", str(plen), "-n", "0"], b + decode]
        ctx = batch * (plen + n) + 16
        return [
            [self.lc.tool("llama-batched-bench"), "-m", m, "-t", t, "-tb", t, "-c", str(ctx)]
            + ["-b", "2048", "-ub", "512", "-npp", str(plen), "-ntg", str(n - 1)]
            + ["-npl", str(batch), "--output-format", "jsonl"]
        ]

    def run(self, prompts: list[list[int]], n: int) -> RunResult:
        batch, plen = len(prompts), len(prompts[0])
        cmds = self.bench_commands(batch, plen, n)
        if batch == 1:
            pp = parse_llama_bench(self._tool(cmds[0]))[0]
            tg = parse_llama_bench(self._tool(cmds[1]))[0]
            self.build = pp["build"]
            self.raw += [pp, tg]
            prefill_s, decode_s = plen / pp["tok_s"], (n - 1) / tg["tok_s"]
        else:
            row = self._batched(cmds[0])
            self.raw.append(row)
            prefill_s, decode_s = row["t_pp"], row["t_tg"]
        # the tools' CPU time covers loading and warm-up too: the per-CPU-second row stays empty
        return RunResult(batch, plen, n, prefill_s, decode_s, [[] for _ in prompts], None)

    def _batched(self, cmd: list[str]) -> dict:
        """llama-batched-bench prints its result through llama.cpp's asynchronous logger, which
        now and then loses the line at exit (seen here once in a few dozen runs): one retry."""
        for attempt in (0, 1):
            try:
                return parse_batched_bench(self._tool(cmd))[0]
            except KvscopeError:
                if attempt:
                    raise
                self.retries += 1
        raise AssertionError("unreachable")

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        cmd = [self.lc.tool("kvscope-greedy-ids"), str(self.gguf), str(n), str(self.threads)]
        out = self._tool(cmd + [",".join(map(str, prompt))])
        ids = [int(x) for x in out.split()]
        if len(ids) != n:
            raise KvscopeError(f"kvscope-greedy-ids returned {len(ids)} tokens, expected {n}")
        return ids

    def close(self) -> None:
        pass
