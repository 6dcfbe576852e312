"""bfloat16 or float32 rows times 4- or 8-bit quantisation blocks on AMX tiles (Intel
CPUs with AMX-BF16).

A Q4_1 weight is w = d * q + m per block of 32 inputs and output column. For each block
the tile unit computes P = x_b . (16 + q_b) with exact products and float32 sums (the
values 16 + q are bfloat16 numbers whose bits are 0x4180 | q << 3, so a nibble becomes
a tile operand with three integer ops and no conversion), and the vector unit adds

    y += d * P + (m - 16 d) * sum(x_b)

So the product is of the exact float32 weights; the dense bf16 path rounds every weight
to bf16 instead. bfloat16 x is multiplied as is; float32 x is split exactly into three
bf16 planes (8 significant bits each), all three multiplied on the tiles, so the
product's error is float32 summation's (a few float32 ulps of the largest output).

Each weight's 4 bits are read once per call whatever the row count (up to 16 rows share
one tile pass), so a 16-row product costs about what a 5-row one does:
benchmarks/block_rows.py, the default model's four products over 30 layers on one
thread, 13.4 ms at 16 bf16 rows against 21.7 for the dense bf16 weights and 40.3 for
torch's int4 kernel.

Layout per 16 output columns (one tile's width) and block: 8 rows of 32 bytes, byte j
of row p holding tile row 2p's word j in its low nibble and row 2p + 1's in its high
one, tile row h word j being q[column j // 2, input 2h + j % 2] (the VNNI pairing).
8-bit blocks (Q8_0, w = d * q) keep one byte a weight in the same word order, 16 rows
of 32 bytes, and take two tiles (see AmxWeight).

The kernel needs the operating system's permission to use tile data (Linux arch_prctl
ARCH_REQ_XCOMP_PERM), asked for once on import; where it is refused, or the CPU lacks
AMX, AVAILABLE is False and callers keep their other paths.
"""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, models, register_model

from kernels.bf16 import bf16_bits, kernel_view, widen
from kernels.simd import F32, I64, V16, declare, fma, pointer_at, splat, vec_t, vload
from kernels.thread_split import run_split, split_parts

BLOCK = 32
TILE_ROWS = 16  # rows of x per tile pass, and output columns per tile
DTYPES = (torch.bfloat16, torch.float32)
# Column groups per thread below which splitting costs more than it saves. Handing a
# range to a pool thread costs more than any of the default model's products takes: 16
# rows, 30 layers, two threads (ad hoc): 3072 x 576 (192 groups) took 5.0 ms unsplit and
# 6.6 split in two, 576 x 576 (36 groups) 1.2 and 3.7.
MIN_GROUPS_PER_THREAD = 512
_SYS_ARCH_PRCTL = 158  # x86_64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

_I16x32 = ir.VectorType(ir.IntType(16), 32)
# bfloat16 bits 0x4180 | (q << 3) are the number 16 + q for q in 0..15: 16 is the least
# offset that keeps every 16 + q exact in bfloat16 (8 significant bits), and the least
# cancellation when the offset's share is taken out again (see _OFFSET).
_MAGIC = 0x4180
_OFFSET = 16
_MAGIC_HIGH = 0x4380  # 256 + 16 q: the same, exponent 4 higher
_OFFSET_8BIT = 400  # 272 from the two tiles' offsets, 128 from q's sign
_I16 = ir.IntType(16)
_BYTES = ir.IntType(8).as_pointer()


def _cpu_has_amx() -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("amx-tile")) and bool(features.get("amx-bf16"))


def _request_tile_permission() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


AVAILABLE = _cpu_has_amx() and _request_tile_permission()


class _TileType(ir.Type):
    """LLVM's x86_amx (llvmlite has no name for it)."""

    def _to_string(self) -> str:
        return "x86_amx"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TileType)

    def __hash__(self) -> int:
        return hash("x86_amx")


_TILE = _TileType()


class _RowsType(types.Type):
    """Sixteen float32 vectors of 16 lanes, one per row of x: the running output of one
    column group, kept in registers across the blocks."""

    def __init__(self) -> None:
        super().__init__(name="AmxRows16")


_rows_t = _RowsType()
_ROWS = ir.ArrayType(V16, TILE_ROWS)


@register_model(_RowsType)
class _RowsModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _ROWS)


@intrinsic
def _zero_rows(typingctx):
    return _rows_t(), lambda context, builder, sig, args: ir.Constant(_ROWS, None)


@intrinsic
def _expand_pair(typingctx, source, target):
    """32 bytes at `source` -> tile rows 2p and 2p + 1 (64 bytes each) at `target`, as the
    bfloat16 numbers 16 + nibble."""

    def codegen(context, builder, sig, args):
        source = pointer_at(builder, args[0], 0, ir.VectorType(ir.IntType(8), 32))
        raw = builder.load(source, align=1)
        raw = builder.zext(raw, _I16x32)
        magic = ir.Constant(_I16x32, [_MAGIC] * 32)
        three = ir.Constant(_I16x32, [3] * 32)
        low = builder.shl(builder.and_(raw, ir.Constant(_I16x32, [15] * 32)), three)
        high = builder.shl(builder.lshr(raw, ir.Constant(_I16x32, [4] * 32)), three)
        low, high = builder.or_(low, magic), builder.or_(high, magic)
        builder.store(low, pointer_at(builder, args[1], 0, _I16x32), align=64)
        builder.store(high, pointer_at(builder, args[1], 64, _I16x32), align=64)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@intrinsic
def _expand_bytes(typingctx, source, high_target, low_target):
    """32 bytes u (8-bit values plus 128) at `source` -> one tile row of 256 + 16 * (u >> 4)
    at `high_target` and one of 16 + (u & 15) at `low_target`, as bfloat16 numbers."""

    def codegen(context, builder, sig, args):
        source = pointer_at(builder, args[0], 0, ir.VectorType(ir.IntType(8), 32))
        raw = builder.zext(builder.load(source, align=1), _I16x32)
        three = ir.Constant(_I16x32, [3] * 32)
        high = builder.shl(builder.lshr(raw, ir.Constant(_I16x32, [4] * 32)), three)
        low = builder.shl(builder.and_(raw, ir.Constant(_I16x32, [15] * 32)), three)
        high = builder.or_(high, ir.Constant(_I16x32, [_MAGIC_HIGH] * 32))
        low = builder.or_(low, ir.Constant(_I16x32, [_MAGIC] * 32))
        builder.store(high, pointer_at(builder, args[1], 0, _I16x32), align=64)
        builder.store(low, pointer_at(builder, args[2], 0, _I16x32), align=64)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@intrinsic
def _tile_product(typingctx, product, x_address, planes, x_stride, tiles):
    """P [16, 16] float32 at `product` = the sum over the planes (a tuple of byte offsets
    from x_address) and the tiles (a tuple of addresses of 1 KB tiles) of x [16 rows of 32
    bf16 at x_address + offset, x_stride bytes apart] . tile."""
    if not (isinstance(planes, types.UniTuple) and isinstance(tiles, types.UniTuple)):
        return None

    def codegen(context, builder, sig, args):
        out, xa, offsets, stride, tile_addresses = args
        rows, width = _I16(TILE_ROWS), _I16(64)
        load = declare(builder, "llvm.x86.tileloadd64.internal", _TILE, [_I16, _I16, _BYTES, I64])
        dot = declare(builder, "llvm.x86.tdpbf16ps.internal", _TILE, [_I16] * 3 + [_TILE] * 3)
        zero = declare(builder, "llvm.x86.tilezero.internal", _TILE, [_I16, _I16])
        store_args = [_I16, _I16, _BYTES, I64, _TILE]
        store = declare(builder, "llvm.x86.tilestored64.internal", ir.VoidType(), store_args)
        acc = builder.call(zero, [rows, width])
        a_tiles = []
        for i in range(planes.count):
            address = builder.add(xa, builder.extract_value(offsets, i))
            a_tiles.append(
                builder.call(load, [rows, width, builder.inttoptr(address, _BYTES), stride])
            )
        for j in range(tiles.count):
            address = builder.inttoptr(builder.extract_value(tile_addresses, j), _BYTES)
            b = builder.call(load, [rows, width, address, I64(64)])
            for a in a_tiles:
                acc = builder.call(dot, [rows, width, width, acc, a, b])
        builder.call(store, [rows, width, builder.inttoptr(out, _BYTES), I64(64), acc])
        return context.get_dummy_value()

    sig = types.void(types.int64, types.int64, planes, types.int64, tiles)
    return sig, codegen


@intrinsic
def _add_scaled(typingctx, rows, product, d, shift, sums, sums_stride):
    """rows[r] += d * P[r] + shift * sums[r] for the 16 rows (P rows 64 bytes apart at
    `product`; sums[r] the float32 at sums + r * sums_stride)."""

    def codegen(context, builder, sig, args):
        acc, out, d, shift, sums, stride = args
        for r in range(TILE_ROWS):
            p = builder.load(pointer_at(builder, out, 64 * r, V16), align=64)
            address = builder.add(sums, builder.mul(stride, I64(r)))
            s = builder.load(builder.inttoptr(address, F32.as_pointer()), align=4)
            row = fma(builder, shift, splat(builder, s), builder.extract_value(acc, r))
            acc = builder.insert_value(acc, fma(builder, d, p, row), r)
        return acc

    sig = _rows_t(_rows_t, types.int64, vec_t, vec_t, types.int64, types.int64)
    return sig, codegen


@intrinsic
def _store_rows_bf16(typingctx, rows, address, stride):
    """Round the 16 rows to bfloat16 (nearest, ties to even) and store each 32 bytes at
    address + r * stride."""

    def codegen(context, builder, sig, args):
        acc, base, step = args
        half = ir.VectorType(ir.IntType(16), 16)
        for r in range(TILE_ROWS):
            bits = builder.bitcast(builder.extract_value(acc, r), ir.VectorType(ir.IntType(32), 16))
            lsb = builder.and_(builder.lshr(bits, _splat32(16)), _splat32(1))
            bits = builder.add(bits, builder.add(_splat32(0x7FFF), lsb))
            value = builder.trunc(builder.lshr(bits, _splat32(16)), half)
            target = builder.add(base, builder.mul(step, I64(r)))
            builder.store(value, builder.inttoptr(target, half.as_pointer()), align=2)
        return context.get_dummy_value()

    return types.void(_rows_t, types.int64, types.int64), codegen


@intrinsic
def _store_rows_f32(typingctx, rows, address, stride):
    """Store each of the 16 rows (64 bytes) at address + r * stride."""

    def codegen(context, builder, sig, args):
        acc, base, step = args
        for r in range(TILE_ROWS):
            target = builder.add(base, builder.mul(step, I64(r)))
            builder.store(builder.extract_value(acc, r), builder.inttoptr(target, V16.as_pointer()))
        return context.get_dummy_value()

    return types.void(_rows_t, types.int64, types.int64), codegen


def _splat32(value: int) -> ir.Constant:
    return ir.Constant(ir.VectorType(ir.IntType(32), 16), [value] * 16)


# Not fastmath: each remainder must be computed as written for the split to be exact.
@njit(nogil=True, cache=True)
def _split_planes(x, planes, sums):  # pragma: no cover - compiled
    """Write x [rows, in] (float32, or bfloat16 bits) into planes [1 or 3, rows or more,
    in] of bfloat16 bits whose sum is x: one plane holds a bf16 x as is; three hold a
    float32 x exactly (8 significant bits each, 24 in all: the nearest bf16, then the
    rounded remainders). sums[r, b] = the sum of x[r]'s b-th block of 32, in float32."""
    for r in range(x.shape[0]):
        for b in range(sums.shape[1]):
            s = np.float32(0.0)
            for i in range(b * BLOCK, b * BLOCK + BLOCK):
                value = widen(x[r, i])
                s += value
                for plane in range(planes.shape[0]):
                    bits = bf16_bits(value)
                    planes[plane, r, i] = bits
                    value = value - widen(bits)
            sums[r, b] = s


@njit(nogil=True, fastmath=True, cache=True)
def _amx_matmul(q, d, shift, x, planes, sums, y, g0, g1):  # pragma: no cover - compiled
    """y[:, 16g:16g + 16] for column groups g0..g1: x 16 rows of bf16 bits, summed over
    `planes` (byte offsets from x's start, see _tile_product); y 16 rows of bf16 bits
    or of float32."""
    blocks, eight_bit = q.shape[1], q.shape[2] == TILE_ROWS
    scratch = np.empty(3072 + 64, np.uint8)  # two tiles of weights, one of products
    tile = (scratch.ctypes.data + 63) & ~63
    low_tile, product = tile + 1024, tile + 2048
    block_bytes = q.shape[2] * q.shape[3]
    qa, da, sa = q.ctypes.data, d.ctypes.data, shift.ctypes.data
    xa, ya, suma = x.ctypes.data, y.ctypes.data, sums.ctypes.data
    x_stride, y_stride = x.shape[1] * 2, y.shape[1] * y.itemsize
    for g in range(g0, g1):
        rows = _zero_rows()
        for b in range(blocks):
            source = qa + (g * blocks + b) * block_bytes
            if eight_bit:
                for h in range(TILE_ROWS):
                    _expand_bytes(source + 32 * h, tile + 64 * h, low_tile + 64 * h)
                _tile_product(product, xa + 64 * b, planes, x_stride, (tile, low_tile))
            else:
                for p in range(8):
                    _expand_pair(source + 32 * p, tile + 128 * p)
                _tile_product(product, xa + 64 * b, planes, x_stride, (tile,))
            at = (g * blocks + b) * 64
            d_b, shift_b = vload(da + at), vload(sa + at)
            rows = _add_scaled(rows, product, d_b, shift_b, suma + 4 * b, blocks * 4)
        if y.itemsize == 2:
            _store_rows_bf16(rows, ya + 32 * g, y_stride)
        else:
            _store_rows_f32(rows, ya + 64 * g, y_stride)


class AmxWeight:
    """A [out, in] block weight laid out for `matmul`: 4-bit (q uint8 0..15, w = d q + m
    per 32 inputs) or 8-bit (q int8, w = d q); out a multiple of 16.

    An 8-bit block takes two tiles, 256 + 16 * (u >> 4) and 16 + (u & 15) for u = q + 128
    (each exact in bfloat16), whose products sum to x . (u + 272) = x . q + 400 sum(x)."""

    def __init__(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> None:
        out_features, in_features = q.shape
        if out_features % TILE_ROWS or in_features % BLOCK:
            raise ValueError(f"need [16*i, 32*j] values, got {q.shape}")
        groups, blocks = out_features // TILE_ROWS, in_features // BLOCK
        self.out_features, self.in_features = out_features, in_features
        eight_bit = q.dtype == np.int8
        if eight_bit:
            # [group, column, block, tile row, input of row] -> [group, block, tile row,
            # word j = 2 * column + input]
            u = (q.astype(np.int16) + 128).astype(np.uint8)
            g = u.reshape(groups, TILE_ROWS, blocks, TILE_ROWS, 2).transpose(0, 2, 3, 1, 4)
            self.q = np.ascontiguousarray(g.reshape(groups, blocks, TILE_ROWS, 32))
        else:
            # [group, column, block, pair, row of pair, input of row] -> [group, block,
            # pair, row of pair, word j = 2 * column + input]
            g = q.astype(np.uint8).reshape(groups, TILE_ROWS, blocks, 8, 2, 2)
            g = g.transpose(0, 2, 3, 4, 1, 5).reshape(groups, blocks, 8, 2, 32)
            self.q = np.ascontiguousarray(g[..., 0, :] | (g[..., 1, :] << 4))
        if m is None:
            m = np.zeros_like(d)
        offset = _OFFSET_8BIT if eight_bit else _OFFSET

        def per_group(a: np.ndarray) -> np.ndarray:
            a = a.astype(np.float32).reshape(groups, TILE_ROWS, blocks)
            return np.ascontiguousarray(a.transpose(0, 2, 1))

        self.d = per_group(d)
        self.shift = per_group(m - np.float32(offset) * d.astype(np.float32))

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + self.shift.nbytes

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T for x [rows, in] in bfloat16 (the result rounded to bfloat16 once)
        or float32 (split exactly into three bfloat16 planes, each multiplied on the
        tiles; float32 result)."""
        if x.dtype not in DTYPES or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"need bfloat16 or float32 [rows, {self.in_features}], got {x.dtype} {x.shape}"
            )
        rows = x.shape[0]
        padded = -(-rows // TILE_ROWS) * TILE_ROWS
        y = torch.empty((padded, self.out_features), dtype=x.dtype)
        # rows past x's stay zero: a whole tile pass reads them
        sums = np.zeros((padded, self.in_features // BLOCK), np.float32)
        count = 1 if x.dtype == torch.bfloat16 else 3
        bits = np.zeros((count, padded, self.in_features), np.uint16)
        _split_planes(kernel_view(x.contiguous()), bits, sums)
        planes = tuple(i * bits.strides[0] for i in range(bits.shape[0]))
        yv = kernel_view(y)
        groups = self.out_features // TILE_ROWS
        parts = split_parts(groups, MIN_GROUPS_PER_THREAD)
        for r in range(0, padded, TILE_ROWS):
            args = (self.q, self.d, self.shift, bits[0, r : r + TILE_ROWS], planes)
            args += (sums[r : r + TILE_ROWS], yv[r : r + TILE_ROWS])
            run_split(_amx_matmul, groups, parts, *args)
        return y[:rows]
