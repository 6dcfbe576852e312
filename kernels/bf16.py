"""bfloat16 values in compiled kernels, which see a bfloat16 tensor as uint16 bits.

`widen` reads a float32 from either a float32 or a bfloat16 (uint16) element and
`store_slice` writes float32 values into either (rounding to the nearest bfloat16, ties
to even, as torch converts), so one kernel source serves both dtypes: numba compiles
one version per argument type, and the float32 one is the plain code.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import types
from numba.extending import intrinsic, overload


def _bitcast_intrinsic(source, target):
    @intrinsic
    def bitcast(typingctx, value):
        sig = target(source)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return sig, codegen

    return bitcast


_bits_as_f32 = _bitcast_intrinsic(types.uint32, types.float32)
_f32_as_bits = _bitcast_intrinsic(types.float32, types.uint32)


def widen(x):
    """x as float32: a bfloat16 (uint16 bits) widened, a float32 as is."""


@overload(widen, inline="always")
def _widen_impl(x):
    if x == types.uint16:
        return lambda x: _bits_as_f32(np.uint32(x) << np.uint32(16))
    return lambda x: x


def bf16_bits(value):
    """The bfloat16 nearest to float32 `value` (ties to even), as uint16 bits."""


@overload(bf16_bits, inline="always")
def _bf16_bits_impl(value):
    def impl(value):
        bits = _f32_as_bits(np.float32(value))
        bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return np.uint16(bits >> np.uint32(16))

    return impl


def round_as(value, like):
    """float32 `value` rounded to the precision of array `like`'s elements (bfloat16 for
    uint16 bits, none for float32), still as a float32."""


@overload(round_as, inline="always")
def _round_as_impl(value, like):
    if like.dtype == types.uint16:
        return lambda value, like: widen(bf16_bits(value))
    return lambda value, like: np.float32(value)


def store_slice(out, start, values):
    """out[start:start + len(values)] = values (float32), rounded when out is bfloat16."""


@overload(store_slice, inline="always")
def _store_slice_impl(out, start, values):
    if out.dtype == types.uint16:

        def rounded(out, start, values):
            for i in range(values.shape[0]):
                out[start + i] = bf16_bits(values[i])

        return rounded

    def as_is(out, start, values):
        out[start : start + values.shape[0]] = values

    return as_is


def kernel_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor for a kernel; bfloat16 as uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()
