"""Preflight of `kvscope gpu-check`: what the device image may lack, found in the first seconds.

Nothing here imports torch or any checked package (a package that is missing or broken must not
stop the check itself): presence and versions come from package metadata. Each missing or too-old
package gets one line saying what it is needed for and the exact pip command that installs it,
from the package registry or from a wheel folder (``--wheels DIR``: no network needed, which is
how the GPU machines run). The command is run unless ``--no-install``.

The device image (../shared/ANCHORS.md) has torch 2.11.0+cu130, triton 3.6.0, transformers
5.17.0 and no bitsandbytes.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Need:
    dist: str  # distribution name on the package registry
    minimum: str  # lowest version that works ("" = any)
    why: str  # what needs it (sections of the check)
    exact: bool = False  # the version is pinned (the transformers peer)


# Mirrors pyproject.toml (runtime deps + the transformers peer of the test extra);
# tests/app/test_gpu_check.py holds the two together.
NEEDS = (
    Need("torch", "2.11", "everything"),
    Need("triton", "3.6", "kernels (section 1) and the kernel path"),
    Need("safetensors", "0.5", "checkpoints"),
    Need("tokenizers", "0.21", "runtime imports"),
    Need("jinja2", "3.1", "runtime imports (chat templates)"),
    Need("accelerate", "1.10", "offload peer (section 5)"),
    Need("bitsandbytes", "0.50", "nf4 / int8 weights (offload, section 5)"),
    Need("transformers", "5.23.0", "the transformers peer (sections 2 and 5)", exact=True),
)


@dataclass
class Finding:
    need: Need
    installed: str | None  # version found, None when absent

    @property
    def spec(self) -> str:
        n = self.need
        if not n.minimum:
            return n.dist
        return f"{n.dist}{'==' if n.exact else '>='}{n.minimum}"

    @property
    def ok(self) -> bool:
        if self.installed is None:
            return False
        if not self.need.minimum:
            return True
        have, want = _vtuple(self.installed), _vtuple(self.need.minimum)
        return have == want if self.need.exact else have >= want


def _vtuple(v: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); '0.50.0.dev1' -> (0, 50, 0)."""
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    while len(out) > 1 and out[-1] == 0:
        out.pop()
    return tuple(out)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check(needs: tuple[Need, ...] = NEEDS, version_of=_version) -> list[Finding]:
    return [Finding(n, version_of(n.dist)) for n in needs]


def install_command(specs: list[str], wheels: str | None) -> list[str]:
    """pip from the registry, or from a wheel folder only (no network)."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if wheels:
        cmd += ["--no-index", "--find-links", wheels]
    else:  # a machine without network fails in seconds, not after pip's default retries
        cmd += ["--retries", "1", "--timeout", "10"]
    return cmd + specs


def describe(f: Finding, wheels: str | None) -> str:
    """One line per missing / unsuitable package: what, what for, how it gets installed."""
    state = "missing" if f.installed is None else f"version {f.installed}, wanted {f.spec}"
    src = f"from the wheel folder {wheels}" if wheels else "from the package registry"
    cmd = shlex.join(install_command([f.spec], wheels))
    return f"preflight: {f.need.dist} {state} (needed by {f.need.why}); install {src}: {cmd}"


def preflight(
    wheels: str | None = None, install: bool = True, run=subprocess.run, findings=None
) -> dict:
    """Check, print a line per problem, install unless told not to, check again. Returns the
    JSON record: found versions, the problems, what was installed and what is still missing."""
    findings = findings if findings is not None else check()
    bad = [f for f in findings if not f.ok]
    record: dict = {
        "found": {f.need.dist: f.installed for f in findings},
        "problems": [describe(f, wheels) for f in bad],
        "installed": [],
        "still_missing": [],
    }
    for line in record["problems"]:
        print(line, flush=True)
    if not bad:
        print("preflight: every package present", flush=True)
        return record
    if not install:
        print("preflight: --no-install: nothing installed; sections needing them will fail")
        record["still_missing"] = [f.spec for f in bad]
        return record
    for f in bad:  # one at a time: a wheel that is not there must not block the others
        cmd = install_command([f.spec], wheels)
        r = run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode == 0:
            record["installed"].append(f.spec)
            print(f"preflight: installed {f.spec}", flush=True)
        else:
            tail = (r.stderr or r.stdout or "").strip().splitlines()[-1:] or [""]
            record["still_missing"].append(f.spec)
            print(f"preflight: could not install {f.spec}: {tail[0]}", flush=True)
    return record
