"""Matrix products for the models, with CPU weights optionally pre-packed for oneDNN.

On CPU, MKL's GEMM repacks the weight matrix on every call; for the skinny activations
of decode (a few rows) that repacking costs as much as the product. oneDNN can take a
weight reordered once into its blocked layout: on the 2-core test machine a decode-sized
product got about 2x faster. `pack_linear_weights` swaps a model's matmul weights for
packed copies after loading; `linear` dispatches on the weight's layout.

A model converted from a quantised GGUF may also carry its weights as quantisation
blocks (kernels.block_linear): for a few rows of input `linear` multiplies from those,
reading a quarter of the bytes, and from the dense weight otherwise (see BlockWeight.matmul
for how float32 and bfloat16 rows are multiplied).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kernels.block_linear import MATMUL_DTYPES as BLOCK_DTYPES
from kernels.block_linear import MAX_ROWS, BlockWeight

logger = logging.getLogger(__name__)

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Rows the packed layout is tuned for. Measured on a 576x3072 product: hint 16 is as fast
# as hint 1 for one row (285-310 us) and 1.7x faster for 16 rows (384 vs 643 us).
PACK_BATCH_HINT = 16


def decode_sized(x: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether x [rows, ...] is a decode-sized input the compiled few-row kernels take:
    at most `max_rows` rows (the block products' limit by default) and no gradient to
    record (LoFiT training stays on torch)."""
    return x.shape[0] <= max_rows and not (x.requires_grad and torch.is_grad_enabled())


def _use_blocks(x: torch.Tensor, blocks: BlockWeight | None) -> bool:
    return (
        blocks is not None and x.dtype in BLOCK_DTYPES and decode_sized(x, blocks.max_rows(x.dtype))
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: BlockWeight | None = None,
) -> torch.Tensor:
    """x @ weight.T + bias, for a dense or a pre-packed (oneDNN) weight, or from the same
    weight's quantisation `blocks` when x has few rows."""
    if _use_blocks(x, blocks):
        y = blocks.matmul(x)
        return y if bias is None else y + bias
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def residual_linear(
    x: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    blocks: BlockWeight | None = None,
) -> torch.Tensor:
    """x + linear(h): one addmm for a dense weight without bias."""
    if bias is None and not weight.is_mkldnn and not _use_blocks(h, blocks):
        return torch.addmm(x, h, weight.t())
    return x + linear(h, weight, bias, blocks)


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linear_weights(module: nn.Module, names: tuple[str, ...]) -> int:
    """Replace each named 2-D weight parameter of `module` with a oneDNN-packed tensor.

    Returns how many were packed. Packed weights are read-only and only usable through
    `linear`/`residual_linear`; keep a dense copy elsewhere if something needs to read them.
    """
    packed = 0
    for name in names:
        weight = getattr(module, name, None)
        if weight is None or weight.is_mkldnn or not can_pack(weight):
            continue
        tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        if name in module._parameters:
            del module._parameters[name]
        setattr(module, name, tensor)
        packed += 1
    return packed
