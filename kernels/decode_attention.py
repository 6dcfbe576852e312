"""Decode attention for a whole batch in one compiled call (CPU, float32 or bfloat16 KV).

At decode each sequence adds one token per layer, and the per-sequence torch ops (two
small matmuls, a softmax, the KV appends) cost more in dispatch than in arithmetic once
16 sequences share a step. Here one numba kernel appends every sequence's new K/V row
to its own cache buffer and attends over it, (sequence, KV head) by (sequence, KV head),
reading each key row once for all query heads of its GQA group. Arithmetic is in float32;
bfloat16 rows are widened as they are read (a separate widening pass into scratch had
cost ~40% of the kernel). While it scores a key row the kernel prefetches the key row
PREFETCH_ROWS ahead and the value row of the same position, so the value pass finds its
rows cached (16 sequences x 512 tokens, 30 layers: 1.3-1.6x faster than without).

Each sequence's cache stays where it is: its own buffer [Hkv, capacity, D] and any
frozen prefix-cache segments before it, which the kernel reaches by address, so nothing
is gathered, padded or merged.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels.bf16 import kernel_view, store_slice, widen
from kernels.thread_split import run_ranges, split_parts

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# KV rows (summed over heads) per thread below which splitting costs more than it saves.
MIN_ROWS_PER_THREAD = 512
# (sequence, KV head) units per thread below which the split is too uneven to pay: one
# sequence of the default model has 3, which two threads can only share 2:1. Measured with
# the server's passive OpenMP workers, bf16, ms per step, split at 1 unit a thread vs never:
# 1 sequence at 512 tokens 13.2 vs 10.8, at 8K 20.6 vs 18.7 (ad hoc, 2026-12-02); 8 at
# 2K split 33.0 vs 37.2 unsplit.
MIN_UNITS_PER_THREAD = 2
# How far ahead of the key row being scored its successors are prefetched (8 and 32 rows
# measured within 3% of 16).
PREFETCH_ROWS = 16
_JIT = dict(nogil=True, fastmath=True, cache=True)


def _pointer_intrinsic(element):
    @intrinsic
    def as_pointer(typingctx, address):
        sig = types.CPointer(element)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    return as_pointer


_f32_at = _pointer_intrinsic(types.float32)
_u16_at = _pointer_intrinsic(types.uint16)


@intrinsic
def _prefetch(typingctx, address):
    """Hint the cache line at `address` into the caches (llvm.prefetch, read, high locality)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefer_512_bit_vectors(typingctx):
    """Let LLVM vectorise the calling kernel with 512-bit registers. Its cost model for
    this CPU prefers 256 bits; for this kernel 512 measured 1.17-1.2x faster with
    bfloat16 KV and 1.06x with float32 (16 sequences, 30 layers, paired in one process).
    A no-op where this llvmlite cannot attach the function attribute."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        try:  # llvmlite validates attribute names; a key="value" pair goes in verbatim
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except TypeError:
            pass
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always", fastmath=True)
def _exp_nonpositive(x, n, bits):
    """x[:n] = exp(x[:n]) for x[:n] <= 0, as 2^k * p(r) with k = round(x / ln 2): plain
    arithmetic the compiler vectorises (a libm exp call per score is not). Relative error
    below 5e-7; scores under -87 count as -87 (exp 1.6e-38 against the maximum's 1)."""
    scale2 = bits.view(np.float32)
    for j in range(n):
        v = max(x[j], np.float32(-87.0))
        k = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
        r = v - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        x[j] = p * r * r + r + np.float32(1.0)
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    for j in range(n):
        x[j] *= scale2[j]


@njit(inline="always", fastmath=True)
def _softmax_rows(scores, n, maxes, den, bits):
    """In place: each row g of scores[:, :n] becomes exp(s - maxes[g]), maxes holding the
    row maxima (the scoring pass tracks them: a separate max pass does not vectorise and
    had taken ~60% of the softmax); writes the row sums to `den`. `bits` is int32 scratch
    of at least n."""
    group = scores.shape[0]
    for g in range(group):
        row = scores[g]
        m = maxes[g]
        for j in range(n):
            row[j] -= m
        _exp_nonpositive(row, n, bits)
        total = np.float32(0.0)
        for j in range(n):
            total += row[j]
        den[g] = total


@njit(inline="always")
def _append_row(address, stride, row, h, new, itemsize):
    """Write `new` [D] as row `row` of head h of the buffer at `address`."""
    d = new.shape[0]
    if itemsize == 4:
        carray(_f32_at(address + 4 * (h * stride + row * d)), (d,))[:] = new
    else:
        carray(_u16_at(address + 2 * (h * stride + row * d)), (d,))[:] = new


@njit(inline="always", fastmath=True)
def _prefetch_rows(k_base, v_base, r, ns, row_bytes):
    """Prefetch key row r + PREFETCH_ROWS (or the last) and value row r."""
    ahead = min(r + PREFETCH_ROWS, ns - 1) * row_bytes
    for line in range(0, row_bytes, 64):
        _prefetch(k_base + ahead + line)
        _prefetch(v_base + r * row_bytes + line)


@njit(inline="always", fastmath=True)
def _dot_3(key, q0, q1, q2, d):
    """(q0 . key[:d], q1 . key[:d], q2 . key[:d]), key widened once."""
    a0 = a1 = a2 = np.float32(0.0)
    for i in range(d):
        k = widen(key[i])
        a0 += q0[i] * k
        a1 += q1[i] * k
        a2 += q2[i] * k
    return a0, a1, a2


@njit(inline="always", fastmath=True)
def _score_rows_3(keys, v_base, qs, g, scores, maxes, j):
    """scores[h, j + r] = qs[h] . keys[r] for heads h = g, g + 1, g + 2, raising maxes[h]
    to the largest: three heads per pass over each key row, so each is widened once for
    all three."""
    ns, d = keys.shape
    row_bytes = d * keys.itemsize
    k_base = keys.ctypes.data
    q0, q1, q2 = qs[g], qs[g + 1], qs[g + 2]
    s0, s1, s2 = scores[g], scores[g + 1], scores[g + 2]
    m0, m1, m2 = maxes[g], maxes[g + 1], maxes[g + 2]
    for r in range(ns):
        _prefetch_rows(k_base, v_base, r, ns, row_bytes)
        key = keys[r]
        # A constant length lets the compiler unroll the dot products (1.25x at d = 64).
        if d == 64:
            a0, a1, a2 = _dot_3(key, q0, q1, q2, 64)
        elif d == 128:
            a0, a1, a2 = _dot_3(key, q0, q1, q2, 128)
        else:
            a0, a1, a2 = _dot_3(key, q0, q1, q2, d)
        s0[j + r] = a0
        s1[j + r] = a1
        s2[j + r] = a2
        m0, m1, m2 = max(m0, a0), max(m1, a1), max(m2, a2)
    maxes[g], maxes[g + 1], maxes[g + 2] = m0, m1, m2


@njit(inline="always", fastmath=True)
def _score_rows_1(keys, v_base, qs, g, scores, maxes, j):
    """scores[g, j + r] = qs[g] . keys[r], raising maxes[g] to the largest."""
    ns, d = keys.shape
    row_bytes = d * keys.itemsize
    k_base = keys.ctypes.data
    q, s, m = qs[g], scores[g], maxes[g]
    for r in range(ns):
        _prefetch_rows(k_base, v_base, r, ns, row_bytes)
        key = keys[r]
        acc = np.float32(0.0)
        for i in range(d):
            acc += q[i] * widen(key[i])
        s[j + r] = acc
        m = max(m, acc)
    maxes[g] = m


@njit(inline="always", fastmath=True)
def _score_rows(keys, v_base, qs, scores, maxes, j):
    """scores[:, j + r] = qs . keys[r] for every row r of keys [rows, d], raising each
    head's entry of maxes to its largest score; the query heads
    three at a time, then one at a time (with `_add_weighted_rows` likewise, the kernel
    ran 1.26-1.42x faster on the default model's groups of 3 than one head at a time).
    While it scores, the key row PREFETCH_ROWS ahead and the value row of the same
    position are prefetched."""
    group = qs.shape[0]
    whole = group - group % 3
    for g in range(0, whole, 3):
        _score_rows_3(keys, v_base, qs, g, scores, maxes, j)
    for g in range(whole, group):
        _score_rows_1(keys, v_base, qs, g, scores, maxes, j)


@njit(inline="always", fastmath=True)
def _add_weighted_rows_3(values, s0, s1, s2, j, a0, a1, a2):
    """a0, a1, a2 += sum over rows r of s0[j + r], s1[j + r], s2[j + r] * values[r]: four
    rows per pass (a quarter of the accumulator traffic), each widened once for three
    heads."""
    ns, d = values.shape
    whole = ns - ns % 4
    for r in range(0, whole, 4):
        v0, v1, v2, v3 = values[r], values[r + 1], values[r + 2], values[r + 3]
        c = j + r
        p00, p01, p02, p03 = s0[c], s0[c + 1], s0[c + 2], s0[c + 3]
        p10, p11, p12, p13 = s1[c], s1[c + 1], s1[c + 2], s1[c + 3]
        p20, p21, p22, p23 = s2[c], s2[c + 1], s2[c + 2], s2[c + 3]
        for i in range(d):
            w0, w1 = widen(v0[i]), widen(v1[i])
            w2, w3 = widen(v2[i]), widen(v3[i])
            a0[i] += (p00 * w0 + p01 * w1) + (p02 * w2 + p03 * w3)
            a1[i] += (p10 * w0 + p11 * w1) + (p12 * w2 + p13 * w3)
            a2[i] += (p20 * w0 + p21 * w1) + (p22 * w2 + p23 * w3)
    for r in range(whole, ns):
        value = values[r]
        p0, p1, p2 = s0[j + r], s1[j + r], s2[j + r]
        for i in range(d):
            w = widen(value[i])
            a0[i] += p0 * w
            a1[i] += p1 * w
            a2[i] += p2 * w


@njit(inline="always", fastmath=True)
def _add_weighted_rows_1(values, s, j, a):
    """a += sum over rows r of s[j + r] * values[r], four rows per pass."""
    ns, d = values.shape
    whole = ns - ns % 4
    for r in range(0, whole, 4):
        v0, v1, v2, v3 = values[r], values[r + 1], values[r + 2], values[r + 3]
        p0, p1, p2, p3 = s[j + r], s[j + r + 1], s[j + r + 2], s[j + r + 3]
        for i in range(d):
            a[i] += (p0 * widen(v0[i]) + p1 * widen(v1[i])) + (
                p2 * widen(v2[i]) + p3 * widen(v3[i])
            )
    for r in range(whole, ns):
        value = values[r]
        p = s[j + r]
        for i in range(d):
            a[i] += p * widen(value[i])


@njit(inline="always", fastmath=True)
def _add_weighted_rows(values, scores, j, acc_out):
    """acc_out[g] += sum over rows r of values [rows, d] of scores[g, j + r] * values[r],
    the query heads three at a time, then one at a time."""
    group = acc_out.shape[0]
    whole = group - group % 3
    for g in range(0, whole, 3):
        _add_weighted_rows_3(values, scores[g], scores[g + 1], scores[g + 2], j, acc_out[g],
                             acc_out[g + 1], acc_out[g + 2])  # fmt: skip
    for g in range(whole, group):
        _add_weighted_rows_1(values, scores[g], j, acc_out[g])


@njit(inline="always", fastmath=True)
def _score_segments(seg_k, seg_v, seg_stride, seg_len, first, end, h, qs, scores, maxes,
                    itemsize):  # fmt: skip
    """_score_rows over KV head h of segments first .. end - 1, their rows one after
    another in scores (the value rows at seg_v are prefetched alongside)."""
    d = qs.shape[1]
    j = 0
    for s in range(first, end):
        ns = seg_len[s]
        offset = itemsize * h * seg_stride[s]
        if itemsize == 4:
            keys = carray(_f32_at(seg_k[s] + offset), (ns, d))
            _score_rows(keys, seg_v[s] + offset, qs, scores, maxes, j)
        else:
            keys16 = carray(_u16_at(seg_k[s] + offset), (ns, d))
            _score_rows(keys16, seg_v[s] + offset, qs, scores, maxes, j)
        j += ns


@njit(inline="always", fastmath=True)
def _add_weighted_segments(seg_v, seg_stride, seg_len, first, end, h, scores, acc_out,
                           itemsize):  # fmt: skip
    """_add_weighted_rows over KV head h of segments first .. end - 1 (the rows scored
    by `_score_segments`)."""
    d = acc_out.shape[1]
    j = 0
    for s in range(first, end):
        ns = seg_len[s]
        offset = itemsize * h * seg_stride[s]
        if itemsize == 4:
            values = carray(_f32_at(seg_v[s] + offset), (ns, d))
            _add_weighted_rows(values, scores, j, acc_out)
        else:
            values16 = carray(_u16_at(seg_v[s] + offset), (ns, d))
            _add_weighted_rows(values16, scores, j, acc_out)
        j += ns


@njit(inline="always", fastmath=True)
def _write_heads(out, lse, b, h, maxes, den, acc_out, out_row):
    """out and lse of sequence b's query heads of KV head h, from the softmax's row
    maxima and sums and the weighted value sums (out_row: float32 scratch of D)."""
    group = acc_out.shape[0]
    for g in range(group):
        lse[b, h * group + g] = maxes[g] + np.log(den[g])
        for i in range(acc_out.shape[1]):
            out_row[i] = acc_out[g, i] / den[g]
        store_slice(out[b, h * group + g], 0, out_row)


@njit(**_JIT)
def _decode_segments(
    q, k_new, v_new, seg_start, seg_k, seg_v, seg_stride, seg_len, out, lse, scale, lo, hi,
    itemsize, append,
):  # fmt: skip
    """Units lo..hi-1, unit u being KV head u % Hkv of sequence u // Hkv: (with `append`)
    write the new row into the sequence's last segment, then attend over all rows of all
    its segments (one softmax over their union)."""
    _prefer_512_bit_vectors()
    hq, d = q.shape[1], q.shape[2]
    hkv = k_new.shape[1]
    group = hq // hkv
    maxes = np.empty(group, dtype=np.float32)
    den = np.empty(group, dtype=np.float32)
    cap = 0
    scores = np.empty((group, 0), dtype=np.float32)
    exp_bits = np.empty(0, dtype=np.int32)
    acc_out = np.empty((group, d), dtype=np.float32)
    qs = np.empty((group, d), dtype=np.float32)
    out_row = np.empty(d, dtype=np.float32)
    for unit in range(lo, hi):
        b, h = unit // hkv, unit % hkv
        first, last = seg_start[b], seg_start[b + 1] - 1
        n = 0
        for s in range(first, last + 1):
            n += seg_len[s]
        if append:
            row = seg_len[last] - 1
            _append_row(seg_k[last], seg_stride[last], row, h, k_new[b, h], itemsize)
            _append_row(seg_v[last], seg_stride[last], row, h, v_new[b, h], itemsize)
        if n > cap:
            cap = max(n, 2 * cap)
            scores = np.empty((group, cap), dtype=np.float32)
            exp_bits = np.empty(cap, dtype=np.int32)
        for g in range(group):
            for i in range(d):
                qs[g, i] = widen(q[b, h * group + g, i]) * scale
        maxes[:] = -np.inf
        _score_segments(seg_k, seg_v, seg_stride, seg_len, first, last + 1, h, qs, scores,
                        maxes, itemsize)  # fmt: skip
        _softmax_rows(scores, n, maxes, den, exp_bits)
        acc_out[:] = 0.0
        _add_weighted_segments(seg_v, seg_stride, seg_len, first, last + 1, h, scores, acc_out,
                               itemsize)  # fmt: skip
        _write_heads(out, lse, b, h, maxes, den, acc_out, out_row)


def _split_points(lengths: np.ndarray, parts: int) -> list[int]:
    """Unit boundaries giving each part about the same number of KV rows to read."""
    cumulative = np.cumsum(lengths)
    targets = cumulative[-1] * np.arange(1, parts) / parts
    cuts = np.searchsorted(cumulative, targets).tolist()
    return [0] + [min(c + 1, len(lengths)) for c in cuts] + [len(lengths)]


def thread_parts(units: int, rows: int, min_units: int = MIN_UNITS_PER_THREAD) -> int:
    """How many threads to give `units` (sequence, KV head) units reading `rows` KV rows,
    each thread taking at least `min_units`."""
    return min(units // min_units, split_parts(rows, MIN_ROWS_PER_THREAD))


def split_units(seg_start: np.ndarray, seg_len: np.ndarray, num_kv_heads: int) -> list[int]:
    """How `decode_attention` divides a batch's (sequence, KV head) units among threads at
    the current torch thread count: boundaries [0, ..., units] of about equal KV rows (one
    range when splitting does not pay). The same for every layer of a step, so a caller
    can work it out once and pass it as `cuts`."""
    units = (len(seg_start) - 1) * num_kv_heads
    rows = np.repeat(np.add.reduceat(seg_len, seg_start[:-1]), num_kv_heads)
    parts = thread_parts(units, int(rows.sum()))
    return [0, units] if parts <= 1 else _split_points(rows, parts)


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    seg_start: np.ndarray,
    seg_k: np.ndarray,
    seg_v: np.ndarray,
    seg_stride: np.ndarray,
    seg_len: np.ndarray,
    scale: float,
    append: bool = True,
    cuts: list[int] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each sequence's new K/V row and attend over its cache, for a batch.

    q [B, Hq, D]; k_new, v_new [B, Hkv, D] in the caches' dtype. Sequence b's KV lives in
    segments seg_start[b] .. seg_start[b + 1] - 1: segment s is a contiguous pair of
    buffers at addresses seg_k[s], seg_v[s] shaped [Hkv, seg_stride[s] / D, D] of which
    rows [0, seg_len[s]) are attended (each sequence needs at least one row). With
    `append` the new row is first written to row seg_len[s] - 1 of the sequence's last
    segment. `cuts`: the thread split, `split_units(seg_start, seg_len, Hkv)` when None.
    Returns (out [B, Hq, D] in `out_dtype`, float32 or bfloat16, rounded once from the
    float32 result; lse [B, Hq] float32, the log-sum-exp of the scaled scores, see
    kernels.partial_attention). q may be float32 or bfloat16 (widened as read). The
    caller keeps the buffers alive and large enough.
    """
    if k_new.dtype not in KERNEL_DTYPES or out_dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"decode_attention supports {KERNEL_DTYPES}, got {k_new.dtype} and {out_dtype}"
        )
    if q.dtype not in KERNEL_DTYPES:
        q = q.float()
    q = q.contiguous()
    out = torch.empty(q.shape, dtype=out_dtype)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    args = (
        kernel_view(q),
        kernel_view(k_new.contiguous()),
        kernel_view(v_new.contiguous()),
        seg_start,
        seg_k,
        seg_v,
        seg_stride,
        seg_len,
        kernel_view(out),
        lse.numpy(),
        np.float32(scale),
    )
    itemsize = k_new.element_size()
    if cuts is None:
        cuts = split_units(seg_start, seg_len, k_new.shape[1])
    if len(cuts) == 2:
        _decode_segments(*args, cuts[0], cuts[1], itemsize, append)
    else:  # the kernel releases the GIL: other threads take the later units
        run_ranges(_decode_segments, cuts, *args, after=(itemsize, append))
    return out, lse


@njit(**_JIT)
def _score_heads(
    q, group, keys_address, head_stride, n, itemsize, scores, h0, h1
):  # pragma: no cover
    """scores[KV head h's `group` query heads] = their q . keys[h, r] for h in h0..h1, the
    keys of head h being n contiguous rows at keys_address + h * head_stride bytes (read
    by address as C arrays: through a strided array view the compiled loop made scalar
    loads, ~5x slower)."""
    _prefer_512_bit_vectors()
    d = q.shape[1]
    maxes = np.full(group, -np.inf, dtype=np.float32)
    for h in range(h0, h1):
        heads = slice(h * group, (h + 1) * group)
        address = keys_address + h * head_stride
        if itemsize == 4:
            keys = carray(_f32_at(address), (n, d))
            _score_rows(keys, address, q[heads], scores[heads], maxes, 0)
        else:
            keys16 = carray(_u16_at(address), (n, d))
            _score_rows(keys16, address, q[heads], scores[heads], maxes, 0)


def score_keys(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Scores [Hq, N] (float32) of queries q [Hq, D] against CPU keys [Hkv, N, D] (float32
    or bfloat16, each head's rows contiguous), each query head against its GQA group's KV
    head: the decode kernel's score pass, which reads each key row once for all query
    heads of its group."""
    hkv, n, d = keys.shape
    if keys.dtype not in KERNEL_DTYPES or keys.stride(2) != 1 or keys.stride(1) != d:
        raise ValueError(f"score_keys needs {KERNEL_DTYPES} keys with contiguous rows")
    scores = torch.empty((q.shape[0], n), dtype=torch.float32)
    if n:
        queries = q.float().contiguous().numpy()
        size = keys.element_size()
        group = q.shape[0] // hkv
        _score_heads(queries, group, keys.data_ptr(), keys.stride(0) * size, n, size,
                     scores.numpy(), 0, hkv)  # fmt: skip
    return scores
