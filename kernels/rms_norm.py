"""RMSNorm of decode-sized inputs in one compiled call (CPU, float32 or bfloat16).

At decode a layer normalises one row (or a few) twice, and torch spends that time on
dispatch: its RMSNorm is several ops (four more for bfloat16: widen, normalise, round,
scale), 28-39 us a call on the test machine against ~13 us here, most of it the call
itself. Numerics are transformers' LlamaRMSNorm: statistics in float32, and for
bfloat16 the normalised row rounded to bfloat16 before the bfloat16 weight scales it
(rounded again), which makes this bit-identical to the torch path for bfloat16.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from kernels.bf16 import kernel_view, round_as, store_slice, widen

NORM_DTYPES = (torch.float32, torch.bfloat16)
# Rows (of 576) up to which the kernel is used. Measured on the test machine, one call:
# 16 rows 22 us (bfloat16) / 18 us (float32) against torch's 31 / 19 us, 64 rows 50 / 53
# against 142 / 106 us; inside a decode step torch's took ~157 us for 16 bfloat16 rows
# (its worker threads waking), so batched decode of up to 64 sequences takes this path.
NORM_MAX_ROWS = 64


@njit(nogil=True, cache=True)
def _rms_norm_rows(x, weight, eps, out):  # pragma: no cover - compiled
    n = x.shape[1]
    scaled = np.empty(n, np.float32)
    for row in range(x.shape[0]):
        xr = x[row]
        total = np.float32(0.0)
        for i in range(n):
            v = widen(xr[i])
            total += v * v
        inv = np.float32(1.0) / np.sqrt(total / np.float32(n) + eps)
        for i in range(n):
            scaled[i] = widen(weight[i]) * round_as(widen(xr[i]) * inv, xr)
        store_slice(out[row], 0, scaled)


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim of x [rows, n], as
    transformers' LlamaRMSNorm computes it; x and weight share a dtype in NORM_DTYPES."""
    if x.dtype not in NORM_DTYPES or weight.dtype != x.dtype or x.dim() != 2 or weight.dim() != 1:
        raise ValueError(f"need 2-D x and weight of one dtype in {NORM_DTYPES}")
    x = x.contiguous()
    out = torch.empty_like(x)
    _rms_norm_rows(kernel_view(x), kernel_view(weight), np.float32(eps), kernel_view(out))
    return out
