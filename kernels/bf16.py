"""bfloat16 values in compiled kernels, which see a bfloat16 tensor as uint16 bits.

`widen` reads a float32 from either a float32 or a bfloat16 (uint16) element, so one
kernel source serves both dtypes (numba compiles one version per argument type).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def _bits_as_f32(typingctx, bits):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


def widen(x):
    """x as float32: a bfloat16 (uint16 bits) widened, a float32 as is."""


@overload(widen, inline="always")
def _widen_impl(x):
    if x == types.uint16:
        return lambda x: _bits_as_f32(np.uint32(x) << np.uint32(16))
    return lambda x: x


def kernel_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor for a kernel; bfloat16 as uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
