"""16-lane float32 vectors as values in numba kernels (LLVM <16 x float>).

numba has no vector type, and LLVM's autovectoriser keeps a loop's running sums in
memory when they are arrays; a kernel that holds a few of these values instead keeps
them in registers across its loops. Each operation here is one or two LLVM vector
instructions on values passed by address or by value.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
F32 = ir.FloatType()
V16 = ir.VectorType(F32, LANES)
I64 = ir.IntType(64)
_I32x16 = ir.VectorType(ir.IntType(32), LANES)


class _VecType(types.Type):
    def __init__(self) -> None:
        super().__init__(name="F32x16")


vec_t = _VecType()


@register_model(_VecType)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, V16)


def declare(builder, name, ret, args):
    """The declaration of function (or LLVM intrinsic) `name` in the builder's module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def fma(builder, a, b, c):
    """a * b + c, one rounding."""
    return builder.call(declare(builder, "llvm.fma.v16f32", V16, [V16] * 3), [a, b, c])


def pointer_at(builder, address, offset, pointee):
    """A pointer to `pointee` at integer `address` + offset bytes."""
    return builder.inttoptr(builder.add(address, I64(offset)), pointee.as_pointer())


def splat(builder, scalar):
    """The float32 `scalar` in every lane."""
    vector = builder.insert_element(ir.Constant(V16, None), scalar, ir.IntType(32)(0))
    return builder.shuffle_vector(vector, vector, ir.Constant(_I32x16, [0] * LANES))


@intrinsic
def vzero(typingctx):
    return vec_t(), lambda context, builder, sig, args: ir.Constant(V16, None)


@intrinsic
def vload(typingctx, address):
    """The 16 float32 at byte `address`."""

    def codegen(context, builder, sig, args):
        return builder.load(pointer_at(builder, args[0], 0, V16), align=4)

    return vec_t(types.int64), codegen


@intrinsic
def vstore(typingctx, address, value):
    """Store the 16 lanes at byte `address`."""

    def codegen(context, builder, sig, args):
        builder.store(args[1], pointer_at(builder, args[0], 0, V16), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, vec_t), codegen


@intrinsic
def vadd(typingctx, a, b):
    return vec_t(vec_t, vec_t), lambda context, builder, sig, args: builder.fadd(*args)


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c."""
    return vec_t(vec_t, vec_t, vec_t), lambda context, builder, sig, args: fma(builder, *args)


@intrinsic
def vfma_scalar(typingctx, acc, v, s):
    """acc + v * s for a float32 scalar s."""

    def codegen(context, builder, sig, args):
        return fma(builder, args[1], splat(builder, args[2]), args[0])

    return vec_t(vec_t, vec_t, types.float32), codegen


@intrinsic
def nibbles(typingctx, address):
    """The 16 bytes at `address` as (low nibbles, high nibbles), each 16 float32."""

    def codegen(context, builder, sig, args):
        raw = builder.load(pointer_at(builder, args[0], 0, ir.VectorType(ir.IntType(8), 16)))
        raw = builder.zext(raw, _I32x16)
        low = builder.uitofp(builder.and_(raw, ir.Constant(_I32x16, [15] * LANES)), V16)
        high = builder.uitofp(builder.lshr(raw, ir.Constant(_I32x16, [4] * LANES)), V16)
        return context.make_tuple(builder, sig.return_type, [low, high])

    return types.UniTuple(vec_t, 2)(types.int64), codegen
