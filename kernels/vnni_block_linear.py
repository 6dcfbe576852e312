"""Few-row products with 4-bit and 8-bit blocks through AVX512-VNNI integer dot products.

The rows of x are quantised per 32-input block to int8 (xq = round(x / s), s = max|x| /
127), as llama.cpp quantises activations for its Q4_1 products; then each block's
sum q . xq is exact in int32 (`vpdpbusd`: 64 unsigned-by-signed byte products an
instruction) and

    y = sum over blocks b of s_b * (d_b * (q_b . xq_b) + m_b * sum(xq_b)),

the product of the weights with s * xq. One instruction does the work of 64 float FMAs
and the nibbles are never widened to float: on one thread the product runs at about
memory speed (in cache, 87-96 GB/s of weights), and needs no OpenMP wake-ups.

This is an approximation of the exact block product (kernels.block_linear): each x is
off from s * xq by at most s / 2. It is used for bfloat16 rows only. The m term takes the
quantised x too, so its error cancels against the q term's as the weight's own offset
does (with the unquantised sum(x) the error was 2x larger on random rows). What it costs
the default model: benchmarks/decode_nll.py (perplexity 19.984 against 19.979 through
torch's int4 product and 19.947 in float32).

Layout, per tile of 16 output rows and block of 32 inputs: 256 bytes in four 64-byte
vectors; byte 4 i + j of vector k holds output row i's input 8 k + j in its low nibble
and input 8 k + 4 + j in its high one, so one AND (or shift and AND) gives the four
consecutive inputs of each row that `vpdpbusd` multiplies with four bytes of xq. 8-bit
values (Q8_0, the default model's LM head) take 512 bytes: byte 4 i + j of vector k is row
i's input 4 k + j, plus 128 (`vpdpbusd` takes unsigned bytes). d and m are kept as
[tiles, blocks, 16] float16, as GGUF stores them (exactly).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kernels.bf16 import widen
from kernels.simd import V16, declare, pointer_at, vec_t, vfma, vfma_scalar, vstore, vzero
from kernels.thread_split import run_split

TILE_ROWS = 16
BLOCK = 32
_BYTES_PER_BLOCK = TILE_ROWS * BLOCK // 2
_I32 = ir.IntType(32)
_I32x16 = ir.VectorType(_I32, 16)


def _cpu_has_vnni() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("avx512vnni")) and bool(features.get("avx512bw"))


AVAILABLE = _cpu_has_vnni()


@intrinsic
def vload_half(typingctx, address):
    """The 16 float16 at byte `address`, widened to float32 (exact)."""

    def codegen(context, builder, sig, args):
        halves = ir.VectorType(ir.HalfType(), 16)
        return builder.fpext(builder.load(pointer_at(builder, args[0], 0, halves), align=2), V16)

    return vec_t(types.int64), codegen


@intrinsic
def _q4_block_dot(typingctx, q_address, xq_address):
    """sum over the block's 32 inputs of q * xq for the tile's 16 rows, as float32 (exact:
    the int32 sum is below 2^24): q_address the block's 256 bytes, xq_address its 32
    int8 inputs."""

    def codegen(context, builder, sig, args):
        q_addr, xq_addr = args
        dot = declare(builder, "llvm.x86.avx512.vpdpbusd.512", _I32x16, [_I32x16] * 3)
        low_mask = ir.Constant(_I32x16, [0x0F0F0F0F] * 16)
        four = ir.Constant(_I32x16, [4] * 16)
        acc = ir.Constant(_I32x16, [0] * 16)
        for k in range(4):
            raw = builder.load(pointer_at(builder, q_addr, 64 * k, _I32x16), align=1)
            low = builder.and_(raw, low_mask)
            high = builder.and_(builder.lshr(raw, four), low_mask)
            for half, values in ((0, low), (4, high)):
                x4 = builder.load(pointer_at(builder, xq_addr, 8 * k + half, _I32), align=1)
                spread = builder.insert_element(ir.Constant(_I32x16, None), x4, _I32(0))
                spread = builder.shuffle_vector(spread, spread, ir.Constant(_I32x16, [0] * 16))
                acc = builder.call(dot, [acc, values, spread])
        return builder.sitofp(acc, V16)

    return vec_t(types.int64, types.int64), codegen


@intrinsic
def _q8_block_dot(typingctx, q_address, xq_address):
    """_q4_block_dot for 8-bit values stored as q + 128 (unsigned), 512 bytes a block: the
    sum of (q + 128) * xq (below 2^21 in magnitude, exact)."""

    def codegen(context, builder, sig, args):
        q_addr, xq_addr = args
        dot = declare(builder, "llvm.x86.avx512.vpdpbusd.512", _I32x16, [_I32x16] * 3)
        acc = ir.Constant(_I32x16, [0] * 16)
        for k in range(8):
            values = builder.load(pointer_at(builder, q_addr, 64 * k, _I32x16), align=1)
            x4 = builder.load(pointer_at(builder, xq_addr, 4 * k, _I32), align=1)
            spread = builder.insert_element(ir.Constant(_I32x16, None), x4, _I32(0))
            spread = builder.shuffle_vector(spread, spread, ir.Constant(_I32x16, [0] * 16))
            acc = builder.call(dot, [acc, values, spread])
        return builder.sitofp(acc, V16)

    return vec_t(types.int64, types.int64), codegen


@njit(inline="always", fastmath=True)
def _quantize_row(xr, xq, scales, sums):  # pragma: no cover - compiled
    """xq[i] = round(x[i] / s_b), scales[b] = s_b = max|x_b| / 127, sums[b] = s_b * sum(xq_b)
    (the m term takes the same quantised x as the q term, so their errors cancel as the
    weight's own offset does)."""
    for b in range(scales.shape[0]):
        top = np.float32(0.0)
        for i in range(b * BLOCK, b * BLOCK + BLOCK):
            top = max(top, abs(widen(xr[i])))
        scale = top / np.float32(127.0)
        scales[b] = scale
        inverse = np.float32(127.0) / top if top > 0 else np.float32(0.0)
        total = 0
        for i in range(b * BLOCK, b * BLOCK + BLOCK):
            value = np.int32(np.rint(widen(xr[i]) * inverse))
            xq[i] = value
            total += value
        sums[b] = np.float32(total) * scale


@njit(nogil=True, fastmath=True, cache=True)
def _rows_vnni(qt, dt, mt, x, y, t0, t1):  # pragma: no cover - compiled
    """y[:, 16 t:16 t + 16] = x @ W.T (float32) for tiles t0..t1, x quantised per block;
    each tile's weights are read once for all rows of x. 4-bit or 8-bit values, told
    apart by the bytes a block takes."""
    rows = x.shape[0]
    blocks = dt.shape[1]
    block_bytes = qt.shape[1] // blocks
    eight_bit = block_bytes == 2 * _BYTES_PER_BLOCK
    xq = np.empty((rows, x.shape[1]), np.int8)
    scales = np.empty((rows, blocks), np.float32)
    sums = np.empty((rows, blocks), np.float32)
    for row in range(rows):
        _quantize_row(x[row], xq[row], scales[row], sums[row])
    qa, da, ma, xqa = qt.ctypes.data, dt.ctypes.data, mt.ctypes.data, xq.ctypes.data
    ya, n_in, n_out = y.ctypes.data, x.shape[1], y.shape[1]
    for tile in range(t0, t1):
        for row in range(rows):
            acc = vzero()
            for b in range(blocks):
                at = tile * blocks + b
                xb = xqa + row * n_in + b * BLOCK
                if eight_bit:
                    dot = _q8_block_dot(qa + at * block_bytes, xb)
                else:
                    dot = _q4_block_dot(qa + at * block_bytes, xb)
                scaled = vfma_scalar(vzero(), dot, scales[row, b])
                acc = vfma(vload_half(da + at * 32), scaled, acc)
                acc = vfma_scalar(acc, vload_half(ma + at * 32), sums[row, b])
            vstore(ya + (row * n_out + tile * TILE_ROWS) * 4, acc)


def rows_vnni(
    q_tiles: np.ndarray,
    d_tiles: np.ndarray,
    m_tiles: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    parts: int = 1,
) -> None:
    """y [rows, out] float32 = x @ W.T for x [rows, in] (bf16 bits as uint16, or float32)
    and W in `vnni_layout`, its tiles split over `parts` threads."""
    run_split(_rows_vnni, q_tiles.shape[0], parts, q_tiles, d_tiles, m_tiles, x, y)


def float16_exact(a: np.ndarray) -> bool:
    """Whether every value of `a` is a float16 value (so the layout keeps it exactly)."""
    return bool(np.array_equal(a.astype(np.float16).astype(a.dtype), a))


def vnni_layout(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, ...]:
    """(q tiles [tiles, blocks * 256 or 512] uint8, d and m [tiles, blocks, 16] float16
    bits as uint16) from q [out, in] (uint8 values 0..15, or int8) and d, m [out, in / 32];
    out a multiple of 16. 8-bit values are stored as q + 128 and m as m - 128 d, which
    takes the offset out again."""
    out, n_in = q.shape
    if out % TILE_ROWS or n_in % BLOCK:
        raise ValueError(f"need [16k, 32j] weights, got {q.shape}")
    tiles, blocks = out // TILE_ROWS, n_in // BLOCK
    if q.dtype == np.int8:
        # [tiles, 16 rows, blocks, 8 vectors, 4 inputs] -> [tiles, blocks, vectors, rows, 4]
        v = (q.astype(np.int16) + 128).astype(np.uint8).reshape(tiles, TILE_ROWS, blocks, 8, 4)
        packed = v.transpose(0, 2, 3, 1, 4)
        m = m.astype(np.float32) - np.float32(128) * d.astype(np.float32)
    else:
        # [tiles, 16 rows, blocks, 4 vectors, 2 halves, 4 inputs]
        v = q.astype(np.uint8).reshape(tiles, TILE_ROWS, blocks, 4, 2, 4)
        packed = v[:, :, :, :, 0, :] | (v[:, :, :, :, 1, :] << 4)  # [t, rows, b, k, j]
        packed = packed.transpose(0, 2, 3, 1, 4)  # [t, b, k, rows, j]
    q_tiles = np.ascontiguousarray(packed).reshape(tiles, -1)

    def scales(a: np.ndarray) -> np.ndarray:
        if not float16_exact(a):
            raise ValueError("scales are not float16 values (GGUF's are)")
        half = a.astype(np.float16)
        tiled = half.reshape(tiles, TILE_ROWS, blocks).transpose(0, 2, 1)
        return np.ascontiguousarray(tiled).view(np.uint16)  # numba has no float16 arrays

    return q_tiles, scales(d), scales(m)
