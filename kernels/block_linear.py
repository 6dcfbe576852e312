"""Products with weights kept as 32-wide quantisation blocks (GGUF Q4_1 / Q8_0).

A quantised checkpoint's weights are w = d * q + m per block of 32 inputs (q a small
integer, d and m one float each). Dequantised to dense float32 they cost 4 bytes each;
kept as blocks, 0.75 (4-bit values two per byte) or 1.25 (8-bit). Decode of one
sequence reads every weight once per token and is bound by that traffic, so for a few
rows `BlockWeight.matmul` computes

    y = sum over blocks b of d_b * (q_b . x_b) + m_b * sum(x_b)

in float32 straight from the blocks. It is the same product of the same weights as the
dense one (the order of additions differs, so results agree to float32 rounding). A
bfloat16 x is widened as it is read and y rounded to bfloat16 once at the end, so a
bfloat16 model's decode needs no conversions around the product.

Layout: output rows are grouped in tiles of `width` rows, stored input-major
([tiles, inputs, width]), so the inner loop runs across rows with one broadcast input
and each tile is one contiguous stream. 4-bit weights with a multiple of 16 output rows
take tiles of 16 (one vector register's lanes), which `_rows_q4_16` reads with its
running sums held in registers; other weights take the widest tile with the least
padding, for `_tiles_matmul`.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from kernels import amx_block_linear, vnni_block_linear
from kernels.bf16 import kernel_view, store_slice, widen
from kernels.simd import LANES, nibbles, vadd, vfma, vfma_scalar, vload, vstore, vzero
from kernels.thread_split import run_split, split_parts

BLOCK = 32
TILE_WIDTHS = (256, 192, 128)
# Rows of x up to which matmul beats the dense oneDNN product; callers use the dense
# weight above it. benchmarks/block_rows.py on the test machine (AMX), dense time / block
# time for the default model's four products: 1 row 1.34-2.97 (bfloat16) and 1.51-1.70
# (float32); 2 rows 0.79-1.09 and 0.77-1.14; 4 rows 0.42-0.74 and 0.64-0.87.
MAX_ROWS = 1
# Weight-row products (rows of x times weights) per thread below which splitting costs
# more than it saves: handing a range to a pool thread and waiting for it takes ~80 us
# here, about what 0.8M products take (measured: a 960 x 576 product took 100 us alone
# and 160 us split in two; 3072 x 576 took 287 us alone and 225 us split).
MIN_PRODUCTS_PER_THREAD = 800_000
MATMUL_DTYPES = (torch.float32, torch.bfloat16)
# 4-bit weights times bfloat16 rows go through torch's int4 weight-only product, which
# takes Q4_1 blocks as w = (q - 8) * s + z per 32 inputs with s = d and z = m + 8 d (both
# rounded to bfloat16, as it requires). One row, one thread, the default model's four
# products over 30 layers (benchmarks/block_rows.py, session 10's fast phase): 6.8 ms
# against 9.7 for `_rows_q4_16` and 18.8 for the dense bf16 weights. Its float32 path is
# a slow reference (13-17x slower than ours, ad hoc), so float32 rows stay on our kernel.
# Off: every product on our kernel.
TORCH_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
TORCH_INT4_DTYPES = (torch.bfloat16,)
# Rows up to which torch's int4 product beats the dense one (benchmarks/block_rows.py,
# dense / int4 time: 2.7-3.8x at 1-2 rows and 2.1-2.7x at 4 on one thread; at 8 rows
# 1.15-1.49x on one thread and 1.23-1.64x on two; at 16, 0.61-0.86x).
TORCH_INT4_MAX_ROWS = 8
# Where the CPU has AMX, bf16 rows of 4-bit blocks from AMX_MIN_ROWS to AMX_MAX_ROWS go
# through kernels.amx_block_linear instead: its cost hardly depends on the row count (one
# tile pass serves 16 rows). benchmarks/block_rows.py, one thread, the default model's
# four products over 30 layers: AMX 13.9 ms at 4 rows, 14.5 at 8, 13.4 at 16; torch's
# int4 kernel 6.4 at 1 row, 12.2 at 4, 21.8 at 8, 40.3 at 16 (so it keeps up to 4 rows);
# the dense bf16 weights 18.2-21.7.
# float32 rows are split exactly into three bf16 planes there, and take AMX from
# AMX_MIN_ROWS_FLOAT32: same benchmark, float32, AMX 18.9 ms at 8 rows and 22.0 at 16;
# `_rows_q4_16` (row by row) 6.9 at 1 row, 12.7 at 2, 18.9 at 4, 32.3 at 8; the dense
# float32 weights 33.7-54.0 (an earlier run with AMX from 2 rows: 17.2 at 2, 18.9 at 4).
AMX = amx_block_linear.AVAILABLE
# Where the CPU has AVX512-VNNI, bf16 rows of 4-bit and 8-bit blocks up to VNNI_MAX_ROWS
# go through kernels.vnni_block_linear (rows quantised to int8 per block, as llama.cpp
# does) instead of torch's int4 product and our float kernels. One thread, no OpenMP
# wake-ups: the default model's four products over 30 layers (ad hoc, 2026-12-02, no
# AMX) took 3.4-4.7 ms at 1 row, 4.6-4.9 at 2, 5.8-8.6 at 4, 8.6-12.1 at 8; torch's int4
# product on two OpenMP threads 9.7-11.9 at 1-4 rows and 13.3-16.6 at 8 with the
# server's passive workers, 3.2-4.5 at 1-4 rows with spinning ones.
VNNI = vnni_block_linear.AVAILABLE
VNNI_MAX_ROWS = 8
# The VNNI product runs about 4x the products a second of `_tiles_matmul`, so it splits
# across threads only from 4x MIN_PRODUCTS_PER_THREAD: the LM head (49152 x 576) does,
# no layer product of the default model (at most 3072 x 576) does.
VNNI_MIN_PRODUCTS_PER_THREAD = 4 * MIN_PRODUCTS_PER_THREAD
AMX_MIN_ROWS = 5
AMX_MIN_ROWS_FLOAT32 = 5
# 8-bit blocks (the default model's tied embedding as LM head, 49152 x 576), ad hoc, one
# thread: float32 rows AMX 5.0 ms at 2 rows, 6.4 at 16, dense 8.3 and 13.0 (one row: ours
# 5.3); bfloat16 rows AMX 3.7 ms, dense 3.2-3.4 at 2-16 rows, so they stay dense.
AMX_MIN_ROWS_8BIT = 2
AMX_MAX_ROWS = 16


@njit(inline="always", fastmath=True)
def _add_block_q4(q, xr, start, part):  # pragma: no cover - compiled
    """part += the block's 4-bit values (two per byte: input i in the low nibble of row
    i / 2, i + 1 in the high one) times x[start:start + 32]; returns sum(x) over it."""
    xsum = np.float32(0.0)
    # 8 inputs per pass over the tile's rows: `part` is read and written once per 8
    # products instead of once per 4 (20% faster here; 16 per pass was 5% slower)
    for i in range(start, start + 32, 8):
        x0, x1, x2, x3 = widen(xr[i]), widen(xr[i + 1]), widen(xr[i + 2]), widen(xr[i + 3])
        x4, x5, x6, x7 = widen(xr[i + 4]), widen(xr[i + 5]), widen(xr[i + 6]), widen(xr[i + 7])
        xsum += ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        h = i >> 1
        p0, p1, p2, p3 = q[h], q[h + 1], q[h + 2], q[h + 3]
        for r in range(part.shape[0]):
            a, c, e, g = p0[r], p1[r], p2[r], p3[r]
            s0 = np.float32(a & 15) * x0 + np.float32(a >> 4) * x1
            s1 = np.float32(c & 15) * x2 + np.float32(c >> 4) * x3
            s2 = np.float32(e & 15) * x4 + np.float32(e >> 4) * x5
            s3 = np.float32(g & 15) * x6 + np.float32(g >> 4) * x7
            part[r] += (s0 + s1) + (s2 + s3)
    return xsum


@njit(inline="always", fastmath=True)
def _add_block_q8(q, xr, start, part):  # pragma: no cover - compiled
    """_add_block_q4 for one (u)int8 value per byte."""
    xsum = np.float32(0.0)
    for i in range(start, start + 32, 8):
        x0, x1, x2, x3 = widen(xr[i]), widen(xr[i + 1]), widen(xr[i + 2]), widen(xr[i + 3])
        x4, x5, x6, x7 = widen(xr[i + 4]), widen(xr[i + 5]), widen(xr[i + 6]), widen(xr[i + 7])
        xsum += ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        q0, q1, q2, q3 = q[i], q[i + 1], q[i + 2], q[i + 3]
        q4, q5, q6, q7 = q[i + 4], q[i + 5], q[i + 6], q[i + 7]
        for r in range(part.shape[0]):
            s0 = q0[r] * x0 + q1[r] * x1
            s1 = q2[r] * x2 + q3[r] * x3
            s2 = q4[r] * x4 + q5[r] * x5
            s3 = q6[r] * x6 + q7[r] * x7
            part[r] += (s0 + s1) + (s2 + s3)
    return xsum


@njit(nogil=True, fastmath=True, cache=True)
def _tiles_matmul(qt, dt, mt, x, y, t0, t1, packed):  # pragma: no cover - compiled
    """One row of x at a time. The `packed` branch sits at block level: inside the
    8-input loop it had cost 10%; here it measures the same as separate kernels."""
    width = qt.shape[2]
    blocks = dt.shape[1]
    part = np.empty(width, np.float32)
    acc = np.empty(width, np.float32)
    for row in range(x.shape[0]):
        xr = x[row]
        for tile in range(t0, t1):
            q = qt[tile]
            acc[:] = 0.0
            for b in range(blocks):
                part[:] = 0.0
                if packed:
                    xsum = _add_block_q4(q, xr, b * 32, part)
                else:
                    xsum = _add_block_q8(q, xr, b * 32, part)
                db = dt[tile, b]
                mb = mt[tile, b]
                for r in range(width):
                    acc[r] += db[r] * part[r] + mb[r] * xsum
            store_slice(y[row], tile * width, acc)


@njit(inline="always", fastmath=True)
def _q4_16_block(q_address, xs, start):  # pragma: no cover - compiled
    """(sum over the block's even inputs, over its odd ones) of q times x for the 16
    output rows of one tile: q_address its 16 rows of 16 bytes, xs[start:start + 32]."""
    even, odd = vzero(), vzero()
    for h in range(16):
        low, high = nibbles(q_address + 16 * h)
        even = vfma_scalar(even, low, xs[start + 2 * h])
        odd = vfma_scalar(odd, high, xs[start + 2 * h + 1])
    return even, odd


@njit(nogil=True, fastmath=True, cache=True)
def _rows_q4_16(qt, dt, mt, x, y, t0, t1):  # pragma: no cover - compiled
    """y[:, 16t:16t + 16] = x @ W.T for tiles t0..t1 of 16 output rows (4-bit values,
    tiles of width 16), in float32. Two tiles at a time, each with two running sums, so
    four independent chains of vector FMAs are in flight."""
    blocks = dt.shape[1]
    half = qt.shape[1]
    xs = np.empty(x.shape[1], np.float32)
    sums = np.empty(blocks, np.float32)
    qa, da, ma = qt.ctypes.data, dt.ctypes.data, mt.ctypes.data
    for row in range(x.shape[0]):
        for b in range(blocks):
            s = np.float32(0.0)
            for i in range(b * BLOCK, b * BLOCK + BLOCK):
                xs[i] = widen(x[row, i])
                s += xs[i]
            sums[b] = s
        ya = y[row].ctypes.data
        tile = t0
        while tile < t1:
            pair = tile + 1 < t1
            acc0, acc1 = vzero(), vzero()
            for b in range(blocks):
                at0 = qa + (tile * half + b * 16) * LANES
                even0, odd0 = _q4_16_block(at0, xs, b * BLOCK)
                scales = (tile * blocks + b) * LANES * 4
                acc0 = vfma(vload(da + scales), vadd(even0, odd0), acc0)
                acc0 = vfma_scalar(acc0, vload(ma + scales), sums[b])
                if pair:
                    even1, odd1 = _q4_16_block(at0 + half * LANES, xs, b * BLOCK)
                    scales += blocks * LANES * 4
                    acc1 = vfma(vload(da + scales), vadd(even1, odd1), acc1)
                    acc1 = vfma_scalar(acc1, vload(ma + scales), sums[b])
            vstore(ya + tile * LANES * 4, acc0)
            if pair:
                vstore(ya + (tile + 1) * LANES * 4, acc1)
            tile += 2


@njit(nogil=True, fastmath=True, cache=True)
def _tiles_matmul_rows(qt, dt, mt, x, y, t0, t1, packed):  # pragma: no cover - compiled
    """_tiles_matmul for several rows of x: each group of 4 weight rows is widened to
    float32 once and used for every row of x."""
    n_in = dt.shape[1] * 32
    width = qt.shape[2]
    rows = x.shape[0]
    blocks = n_in // 32
    wide = np.empty((4, width), np.float32)
    part = np.empty((rows, width), np.float32)
    acc = np.empty((rows, width), np.float32)
    xsum = np.empty(rows, np.float32)
    for tile in range(t0, t1):
        q = qt[tile]
        acc[:] = 0.0
        for b in range(blocks):
            part[:] = 0.0
            xsum[:] = 0.0
            for i in range(b * 32, b * 32 + 32, 4):
                if packed:
                    for j in range(2):
                        src = q[(i >> 1) + j]
                        lo, hi = wide[2 * j], wide[2 * j + 1]
                        for r in range(width):
                            lo[r] = src[r] & 15
                            hi[r] = src[r] >> 4
                else:
                    for j in range(4):
                        src = q[i + j]
                        dst = wide[j]
                        for r in range(width):
                            dst[r] = src[r]
                w0, w1, w2, w3 = wide[0], wide[1], wide[2], wide[3]
                for row in range(rows):
                    x0, x1 = widen(x[row, i]), widen(x[row, i + 1])
                    x2, x3 = widen(x[row, i + 2]), widen(x[row, i + 3])
                    xsum[row] += (x0 + x1) + (x2 + x3)
                    pr = part[row]
                    for r in range(width):
                        pr[r] += (w0[r] * x0 + w1[r] * x1) + (w2[r] * x2 + w3[r] * x3)
            db = dt[tile, b]
            mb = mt[tile, b]
            for row in range(rows):
                ar, pr, xs = acc[row], part[row], xsum[row]
                for r in range(width):
                    ar[r] += db[r] * pr[r] + mb[r] * xs
        for row in range(rows):
            store_slice(y[row], tile * width, acc[row])


def _tile_width(rows: int, packed: bool) -> int:
    """16 for 4-bit values in whole tiles of 16 (see `_rows_q4_16`); otherwise the tile
    width with the least padding, the widest among equals."""
    if packed and rows % LANES == 0:
        return LANES
    return min(TILE_WIDTHS, key=lambda w: (-rows % w, -w))


def _to_tiles(a: np.ndarray, width: int) -> np.ndarray:
    """[rows, cols] -> [tiles, cols, width], rows zero-padded to a multiple of width."""
    rows = a.shape[0]
    padded = np.zeros((-(-rows // width) * width, a.shape[1]), a.dtype)
    padded[:rows] = a
    return np.ascontiguousarray(padded.reshape(-1, width, a.shape[1]).transpose(0, 2, 1))


def _pack_nibbles(tiles: np.ndarray) -> np.ndarray:
    """[tiles, in, width] values 0..15 -> [tiles, in / 2, width], input 2j in the low
    nibble of row j and 2j + 1 in the high one."""
    return np.ascontiguousarray(tiles[:, 0::2] | (tiles[:, 1::2] << 4))


def _unpack_nibbles(tiles: np.ndarray) -> np.ndarray:
    out = np.empty((tiles.shape[0], 2 * tiles.shape[1], tiles.shape[2]), np.uint8)
    out[:, 0::2], out[:, 1::2] = tiles & 15, tiles >> 4
    return out


class BlockWeight:
    """A [out, in] weight as q [out, in] (uint8 or int8), d and m [out, in / 32] float32.

    4-bit values (uint8 0..15, as Q4_1 has) are stored two to a byte.
    """

    def __init__(self, q: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> None:
        out_features, in_features = q.shape
        if in_features % BLOCK or q.dtype not in (np.uint8, np.int8):
            raise ValueError(f"need [out, k*{BLOCK}] uint8/int8 values, got {q.dtype} {q.shape}")
        blocks = (out_features, in_features // BLOCK)
        if m is None:
            m = np.zeros(blocks, np.float32)
        if d.shape != blocks or m.shape != blocks:
            raise ValueError(f"scales must be {blocks}, got {d.shape} and {m.shape}")
        self.out_features, self.in_features = out_features, in_features
        self.packed = q.dtype == np.uint8 and int(q.max(initial=0)) < 16
        self.width = _tile_width(out_features, self.packed)
        self.q_tiles = _to_tiles(q, self.width)
        if self.packed:
            self.q_tiles = _pack_nibbles(self.q_tiles)
        self.d_tiles = _to_tiles(d.astype(np.float32), self.width)
        self.m_tiles = _to_tiles(m.astype(np.float32), self.width)
        self._int4: tuple[torch.Tensor, torch.Tensor] | None = None
        self._amx: amx_block_linear.AmxWeight | None = None
        # made on first use; False where the scales cannot take the layout
        self._vnni: tuple[np.ndarray, np.ndarray, np.ndarray] | bool | None = None

    @classmethod
    def from_tiles(
        cls,
        q_tiles: np.ndarray,
        d_tiles: np.ndarray,
        m_tiles: np.ndarray,
        out_features: int,
        packed: bool,
    ) -> BlockWeight:
        """Rebuild from the stored layout (`tiles()`, `packed`), e.g. read from a file."""
        weight = cls.__new__(cls)
        weight.q_tiles, weight.d_tiles, weight.m_tiles = q_tiles, d_tiles, m_tiles
        weight.packed = packed
        weight.width = q_tiles.shape[2]
        weight.in_features = q_tiles.shape[1] * (2 if packed else 1)
        weight.out_features = out_features
        weight._int4 = None
        weight._amx = None
        weight._vnni = None
        if d_tiles.shape != m_tiles.shape or d_tiles.shape[1] * BLOCK != weight.in_features:
            raise ValueError("inconsistent block tiles")
        return weight

    def tiles(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored layout: q [tiles, in (/ 2 when packed), width], d and m
        [tiles, in / 32, width]."""
        return self.q_tiles, self.d_tiles, self.m_tiles

    @classmethod
    def concat(cls, parts: list[BlockWeight]) -> BlockWeight:
        """The weight whose rows are those of `parts` in order (fused projections)."""
        q, d, m = zip(*(p.blocks() for p in parts), strict=True)
        return cls(np.concatenate(q), np.concatenate(d), np.concatenate(m))

    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(q, d, m) as [out, in], [out, in / 32], [out, in / 32]."""

        def rows(tiles: np.ndarray) -> np.ndarray:
            return tiles.transpose(0, 2, 1).reshape(-1, tiles.shape[1])[: self.out_features]

        q = _unpack_nibbles(self.q_tiles) if self.packed else self.q_tiles
        return rows(q), rows(self.d_tiles), rows(self.m_tiles)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight, rounded as GGUF's dequantisation rounds: d * q + m."""
        q, d, m = self.blocks()
        w = q.astype(np.float32).reshape(self.out_features, -1, BLOCK)
        w = w * d[:, :, None] + m[:, :, None]
        return torch.from_numpy(w.reshape(self.out_features, self.in_features))

    @property
    def nbytes(self) -> int:
        return self.q_tiles.nbytes + self.d_tiles.nbytes + self.m_tiles.nbytes

    def torch_int4(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed values, scales and zeros) for torch's int4 product with `dtype` rows, made
        on first use (a Llama model makes it at load, in pack_weights); None where it
        does not apply (see TORCH_INT4)."""
        if not self._int4_applies(dtype):
            return None
        if self._int4 is None:  # only one dtype takes it, so one packing serves
            q, d, m = self.blocks()
            values = torch.from_numpy(q.astype(np.int32))
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 2)
            scale, zero = torch.from_numpy(d).t(), torch.from_numpy(m + 8 * d).t()
            self._int4 = (packed, torch.stack([scale, zero], -1).to(dtype).contiguous())
        return self._int4

    def _int4_applies(self, dtype: torch.dtype) -> bool:
        """Whether torch's int4 product takes `dtype` rows of these blocks (see TORCH_INT4;
        16 | out is the packing's requirement)."""
        return (
            TORCH_INT4
            and dtype in TORCH_INT4_DTYPES
            and self.packed
            and not self.out_features % 16
            and self.vnni(dtype) is None
        )

    def vnni(self, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The layout for kernels.vnni_block_linear with `dtype` rows, made on first use (a
        Llama model makes it at load); None where it does not apply: other than bf16
        rows, no VNNI, a row count not in whole tiles of 16, or scales that are not
        float16 values (GGUF's are)."""
        if not (VNNI and dtype == torch.bfloat16 and not self.out_features % 16):
            return None
        if self._vnni is None:
            try:
                self._vnni = vnni_block_linear.vnni_layout(*self.blocks())
            except ValueError:
                self._vnni = False
        return self._vnni or None

    def amx(self, dtype: torch.dtype) -> amx_block_linear.AmxWeight | None:
        """The layout for AMX products with `dtype` rows, made on first use (a Llama model
        makes it at load); None where they do not apply (see `amx_rows`)."""
        return None if self.amx_rows(dtype) is None else self._amx_layout()

    def _amx_layout(self) -> amx_block_linear.AmxWeight:
        if self._amx is None:
            self._amx = amx_block_linear.AmxWeight(*self.blocks())
        return self._amx

    def amx_rows(self, dtype: torch.dtype) -> tuple[int, int] | None:
        """The fewest and most rows of `dtype` that go through AMX, or None: 4-bit blocks
        in whole tiles of 16 outputs, and 8-bit ones with float32 rows (with bf16 rows
        the dense weights are faster, see AMX_MIN_ROWS_8BIT)."""
        if not AMX or dtype not in amx_block_linear.DTYPES:
            return None
        if self.out_features % amx_block_linear.TILE_ROWS:
            return None
        if self.packed:
            if dtype == torch.float32:
                return AMX_MIN_ROWS_FLOAT32, AMX_MAX_ROWS
            # below AMX_MIN_ROWS the VNNI or torch's int4 product is faster, where one applies
            few = self.vnni(dtype) is not None or self._int4_applies(dtype)
            return (AMX_MIN_ROWS if few else 1), AMX_MAX_ROWS
        if self.q_tiles.dtype == np.int8 and dtype == torch.float32:
            return AMX_MIN_ROWS_8BIT, AMX_MAX_ROWS
        return None

    def max_rows(self, dtype: torch.dtype) -> int:
        """Rows of `dtype` up to which products from the blocks beat the dense weight."""
        if self.amx_rows(dtype) is not None:
            return AMX_MAX_ROWS
        if self.vnni(dtype) is not None:
            return VNNI_MAX_ROWS
        return TORCH_INT4_MAX_ROWS if self.torch_int4(dtype) is not None else MAX_ROWS

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T for x [rows, in] (meant for rows <= max_rows), in x's dtype:
        float32, or bfloat16 (through torch's int4 product for 4-bit weights, else widened
        as read and the float32 result rounded once); bfloat16 rows from AMX_MIN_ROWS
        and float32 ones from AMX_MIN_ROWS_FLOAT32 up go through AMX tiles where the CPU
        has them."""
        if x.dtype not in MATMUL_DTYPES or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"need float32 or bfloat16 [rows, {self.in_features}], got {x.dtype} {x.shape}"
            )
        span = self.amx_rows(x.dtype)
        if span is not None and x.shape[0] >= span[0]:
            return self._amx_layout().matmul(x)
        vnni = self.vnni(x.dtype)
        if vnni is not None and x.shape[0] <= VNNI_MAX_ROWS:
            y = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
            per_tile = x.shape[0] * 16 * self.in_features
            parts = split_parts(
                self.out_features // 16, -(-VNNI_MIN_PRODUCTS_PER_THREAD // per_tile)
            )
            vnni_block_linear.rows_vnni(*vnni, kernel_view(x.contiguous()), y.numpy(), parts)
            return y.to(x.dtype)
        int4 = self.torch_int4(x.dtype)
        if int4 is not None:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.contiguous(), int4[0], BLOCK, int4[1]
            )
        tiles = self.q_tiles.shape[0]
        vector_tiles = self.packed and self.width == LANES
        out_dtype = torch.float32 if vector_tiles else x.dtype  # rounded below for bf16
        y = torch.empty((x.shape[0], tiles * self.width), dtype=out_dtype)
        args = (self.q_tiles, self.d_tiles, self.m_tiles, kernel_view(x.contiguous()))
        args += (kernel_view(y),)
        if vector_tiles:
            kernel, after = _rows_q4_16, ()
        else:
            kernel = _tiles_matmul if x.shape[0] == 1 else _tiles_matmul_rows
            after = (self.packed,)
        per_tile = x.shape[0] * self.width * self.in_features
        parts = split_parts(tiles, -(-MIN_PRODUCTS_PER_THREAD // per_tile))
        run_split(kernel, tiles, parts, *args, after=after)
        if vector_tiles:
            return y.to(x.dtype)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features].contiguous()
