"""`linear()`: one matrix product for every kind of weight the loader produces (runtime/weights/).

It lives in weights/, not models/, so that weights/ never imports models/ (models import
weights: imports only go down).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T + b for a plain weight tensor [out, in], or for a quantized / offloaded
    weight object that is callable as w(x) (see runtime/weights/)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    if b is not None and getattr(w, "takes_bias", False):  # fused as F.linear's (one rounding)
        return w(x, b)
    y = w(x)
    return y if b is None else y + b
