"""FP8 block-scaled checkpoints as published for GLM-5 / GLM-4.x (DeepSeek-V3 convention).

A quantized linear weight ``<name>.weight`` is stored as float8_e4m3fn [N, K] next to
``<name>.weight_scale_inv``, fp32 [ceil(N / bn), ceil(K / bk)]: one scale per bn x bk block
(128 x 128 as published; ``quantization_config.weight_block_size`` in config.json says which), and
the full-precision weight is ``fp8 * scale_inv`` blockwise (the "inv" is the inverse of the
quantization scale, i.e. the dequantization factor).

Loading: on CPU (and GPUs before Hopper) every FP8 weight is dequantized on the fly to the
compute dtype as it is read. On Hopper (sm_90+) linear weights stay FP8 on the device
(`Fp8BlockWeight`, half the bytes of bf16) and are dequantized per call; a block-scaled FP8 GEMM
would replace that dequantization and is not written yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.errors import CheckpointError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def block_size(model_dir: str | Path) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` from config.json, else the published 128x128."""
    cfg_path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return DEFAULT_BLOCK
    qc = raw.get("quantization_config") or {}
    bs = qc.get("weight_block_size") or DEFAULT_BLOCK
    return int(bs[0]), int(bs[1])


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def _expand(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]):
    bn, bk = block
    n, k = shape
    return scale_inv.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]  # [N, K]


def check_scale(name: str, w: torch.Tensor, scale_inv: torch.Tensor, block, where: str) -> None:
    want = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
    if w.dim() != 2 or tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{where}: '{name}{SCALE_SUFFIX}' has shape {list(scale_inv.shape)} but a "
            f"{list(w.shape)} weight in {block[0]}x{block[1]} blocks needs {list(want)}"
        )


def dequantize_fp8_block(
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """FP8 [N, K] with per-block fp32 scale_inv -> [N, K] in ``dtype`` (math in fp32)."""
    s = _expand(scale_inv.float().to(w.device), tuple(w.shape), block)
    return (w.float() * s).to(dtype)


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8_e4m3fn [N, K], scale_inv fp32 [ceil(N/bn), ceil(K/bk)]), absmax / 448
    per block as the published checkpoints were made."""
    n, k = w.shape
    bn, bk = block
    gn, gk = -(-n // bn), -(-k // bk)
    wf = F.pad(w.float(), (0, gk * bk - k, 0, gn * bn - n))
    amax = wf.view(gn, bn, gk, bk).abs().amax(dim=(1, 3))  # [gn, gk]
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12)
    q = (w.float() / _expand(scale_inv, (n, k), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv


def keep_fp8(device: torch.device) -> bool:
    """Linear weights stay FP8 on the device only on Hopper or newer (sm_90+)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


class Fp8BlockWeight:
    """A linear weight kept in FP8 on the device; dequantized to the activations' dtype per call."""

    def __init__(self, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
        assert w.dtype == FP8_DTYPE
        self.w, self.scale_inv, self.block = w, scale_inv.float(), block

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def nbytes(self) -> int:
        return self.w.numel() + self.scale_inv.numel() * 4

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w": self.w, "scale_inv": self.scale_inv}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_fp8_block(self.w, self.scale_inv, self.block, x.dtype))


def write_fp8_checkpoint(
    src_dir: str | Path,
    out_dir: str | Path,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dequantized_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Re-save a checkpoint with its linear weights in FP8 blocks, as published (test helper and
    tool). With ``dequantized_dir``, also write the same model with the FP8 weights dequantized
    back to fp32: the exact weights a loader of the FP8 checkpoint must end up with. ``device``:
    where the blocks are quantized (a GPU for billions of parameters)."""
    from safetensors.torch import save_file

    from runtime.weights.checkpoint import Checkpoint
    from runtime.weights.quant import is_linear_weight

    src, out = Path(src_dir), Path(out_dir)
    ckpt = Checkpoint(src)
    tensors, deq = {}, {}
    for name in ckpt.keys():
        t = ckpt.get(name)
        if is_linear_weight(name) or name.endswith(".kv_b_proj.weight"):
            q, s = quantize_fp8_block(t.to(device), block)
            tensors[name], tensors[scale_name(name)] = q.cpu(), s.cpu()
            if dequantized_dir is not None:
                deq[name] = dequantize_fp8_block(q, s, block, torch.float32).cpu()
        else:
            tensors[name] = deq[name] = t.contiguous()
    raw = json.loads((src / "config.json").read_text())
    for d, ts, qc in ((out, tensors, True), (dequantized_dir, deq, False)):
        if d is None:
            continue
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(raw)
        if qc:
            cfg["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "weight_block_size": list(block),
            }
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(ts, str(d / "model.safetensors"), metadata={"format": "pt"})
    return out
