"""Retrieval-mode decode attention with an exact host-tier top-k, in one compiled call.

A retrieval decode attends to every row of a sequence's device tier and, per query head,
to the k host-tier rows with the largest scores. With an exact retriever the top-k are
found by scoring every host row, so this kernel does it all at once for a batch: it
scores the device rows and the host rows (each key row read once for the query heads of
its GQA group), picks each query head's k best host scores by bisecting on a threshold
(`_top_k`), prefetches the chosen value rows, and takes one softmax over the device
scores and the chosen host scores. Nothing is gathered, padded or merged, and no
per-layer torch op or index call sits between the steps. Default model, paired in one
process (ad hoc), against scoring, argpartition, gather and merge as separate calls:
bfloat16 decode at 8K 28.0 -> 17.9 ms a token (streaming 10.5), at 2K 21.2 -> 14.1
(10.6); float32 at 8K 53.2 -> 36.5 (15.9, first version); a bfloat16 step of 8
sequences at 8K 227 -> 162 ms (first version).

The result equals attention over the device rows merged by log-sum-exp with attention
over the exact top-k host rows (ties among equal scores broken either way).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit

from kernels.bf16 import kernel_view, widen
from kernels.decode_attention import (
    KERNEL_DTYPES,
    _add_weighted_segments,
    _f32_at,
    _prefer_512_bit_vectors,
    _prefetch,
    _score_segments,
    _softmax_rows,
    _split_points,
    _u16_at,
    _write_heads,
    thread_parts,
)
from kernels.thread_split import run_ranges

_JIT = dict(nogil=True, fastmath=True, cache=True)
# The top-k selection's threshold leaves at most SPARE * k candidates, found in at most
# MAX_BISECTIONS counting passes.
SPARE = 1.5
MAX_BISECTIONS = 40
FIRST_WIDTH, LAST_WIDTH = 16.0, 1e30
# Below any score (no infinities: the kernels compile with fastmath, which assumes none).
LOWEST = -3.0e38


@njit(inline="always", fastmath=True)
def _count_at_least(scores, n, t):
    """How many of scores[:n] are >= t (a compare-and-add loop the compiler vectorises)."""
    c = 0
    for i in range(n):
        c += np.int64(scores[i] >= t)
    return c


@njit(inline="always", fastmath=True)
def _bisect(scores, n, k, floor, ceiling, enough):
    """Narrow [floor, ceiling), where count(scores[:n] >= floor) >= k, until at most
    `enough` scores reach floor (or floats cannot narrow it further); returns both ends.
    count(>= ceiling) < k holds throughout once it held at the start."""
    for _ in range(MAX_BISECTIONS):
        mid = np.float32(0.5) * (floor + ceiling)
        if not floor < mid < ceiling:
            break
        c = _count_at_least(scores, n, mid)
        if c < k:
            ceiling = mid
        else:
            floor = mid
            if c <= enough:
                break
    return floor, ceiling


@njit(inline="always", fastmath=True)
def _top_k(scores, n, top, k, vals, ids, candidates):
    """vals[:k], ids[:k] = the k largest of scores[:n] and their positions, unordered
    (k <= n, top = their maximum; `vals`: float32 scratch of n; `candidates`: int64
    scratch of n + 1). Bisection on a threshold, from top - FIRST_WIDTH (widened until
    k scores reach it), each step one vectorised counting pass, finds a value that
    between k and SPARE * k scores reach; those are gathered and bisected again, now
    cheaply, down to exactly k. (A heap of the best so far re-sorted at nearly every
    score where scores rise with position, as attention scores often do: 2.3x slower
    on the default model.)"""
    ceiling, width = top, np.float32(FIRST_WIDTH)
    floor = ceiling - width
    while _count_at_least(scores, n, floor) < k:
        width *= 2
        floor = ceiling - width if width < LAST_WIDTH else np.float32(LOWEST)
    floor, _ = _bisect(scores, n, k, floor, ceiling, SPARE * k)
    found = 0
    for i in range(n):  # branch-free: candidates[n] is a spare slot
        candidates[found] = i
        found += np.int64(scores[i] >= floor)
    for c in range(found):
        vals[c] = scores[candidates[c]]
    # The same bisection over the few candidates, down to exactly k (or to a run of
    # ties, any of which may be taken).
    floor, ceiling = _bisect(vals, found, k, floor, top + np.float32(1.0) + abs(top), k)
    taken = 0
    for c in range(found):  # the sure ones first, then ties at the threshold up to k
        if vals[c] >= ceiling and taken < k:
            vals[taken], ids[taken] = vals[c], candidates[c]
            taken += 1
    for c in range(found):
        if taken < k and floor <= scores[candidates[c]] < ceiling:
            vals[taken], ids[taken] = scores[candidates[c]], candidates[c]
            taken += 1


@njit(inline="always", fastmath=True)
def _add_chosen_rows(address, row_bytes, p, acc, itemsize):
    """acc += p * the value row at `address` (row_bytes = D * itemsize)."""
    d = acc.shape[0]
    if itemsize == 4:
        row = carray(_f32_at(address), (d,))
        for i in range(d):
            acc[i] += p * row[i]
    else:
        row16 = carray(_u16_at(address), (d,))
        for i in range(d):
            acc[i] += p * widen(row16[i])


@njit(**_JIT)
def _retrieval_segments(
    q, hkv, seg_start, seg_k, seg_v, seg_stride, seg_len, host_start, host_k, host_v,
    host_stride, host_len, top_k, out, lse, lo, hi, itemsize,
):  # fmt: skip
    """Units lo..hi-1, unit u being KV head u % hkv of sequence u // hkv: attention of the
    (already scaled) queries q [B, Hq, D] over every row of the sequence's device segments
    seg_start[b] .. seg_start[b + 1] - 1 and, per query head, over its top_k best rows of
    the host segments host_start[b] .. host_start[b + 1] - 1 (all of them when there are
    fewer), in one softmax."""
    _prefer_512_bit_vectors()
    hq, d = q.shape[1], q.shape[2]
    group = hq // hkv
    row_bytes = d * itemsize
    maxes = np.empty(group, dtype=np.float32)
    host_maxes = np.empty(group, dtype=np.float32)
    den = np.empty(group, dtype=np.float32)
    cap = host_cap = 0
    scores = np.empty((group, 0), dtype=np.float32)
    host_scores = np.empty((group, 0), dtype=np.float32)
    exp_bits = np.empty(0, dtype=np.int32)
    chosen_vals = np.empty(0, dtype=np.float32)
    chosen_ids = np.empty((group, max(top_k, 1)), dtype=np.int64)
    candidates = np.empty(1, dtype=np.int64)
    acc_out = np.empty((group, d), dtype=np.float32)
    qs = np.empty((group, d), dtype=np.float32)
    out_row = np.empty(d, dtype=np.float32)
    for unit in range(lo, hi):
        b, h = unit // hkv, unit % hkv
        n_dev = 0
        for s in range(seg_start[b], seg_start[b + 1]):
            n_dev += seg_len[s]
        n_host = 0
        for s in range(host_start[b], host_start[b + 1]):
            n_host += host_len[s]
        kk = min(top_k, n_host)
        if n_dev + kk > cap:
            cap = max(n_dev + kk, 2 * cap)
            scores = np.empty((group, cap), dtype=np.float32)
            exp_bits = np.empty(cap, dtype=np.int32)
        if n_host > host_cap:
            host_cap = max(n_host, 2 * host_cap)
            host_scores = np.empty((group, host_cap), dtype=np.float32)
            candidates = np.empty(host_cap + 1, dtype=np.int64)
            chosen_vals = np.empty(host_cap, dtype=np.float32)
        for g in range(group):
            for i in range(d):
                qs[g, i] = widen(q[b, h * group + g, i])
        maxes[:] = -np.inf
        first, end = seg_start[b], seg_start[b + 1]
        _score_segments(seg_k, seg_v, seg_stride, seg_len, first, end, h, qs, scores, maxes,
                        itemsize)  # fmt: skip
        if kk:
            host_maxes[:] = -np.inf
            # the key rows themselves are prefetched: few of their values will be read
            h0, h1 = host_start[b], host_start[b + 1]
            _score_segments(host_k, host_k, host_stride, host_len, h0, h1, h, qs, host_scores,
                            host_maxes, itemsize)  # fmt: skip
            for g in range(group):
                _top_k(host_scores[g], n_host, host_maxes[g], kk, chosen_vals, chosen_ids[g],
                       candidates)  # fmt: skip
                m = maxes[g]
                for t in range(kk):
                    scores[g, n_dev + t] = chosen_vals[t]
                    m = max(m, chosen_vals[t])
                    # The value rows are scattered: ask for all of them now, so they
                    # arrive while the softmax and the device rows are computed.
                    row = chosen_ids[g, t]
                    s = host_start[b]
                    while row >= host_len[s]:  # which host segment holds the row
                        row -= host_len[s]
                        s += 1
                    address = host_v[s] + itemsize * (h * host_stride[s] + row * d)
                    chosen_ids[g, t] = address
                    for line in range(0, row_bytes, 64):
                        _prefetch(address + line)
                maxes[g] = m
        _softmax_rows(scores, n_dev + kk, maxes, den, exp_bits)
        acc_out[:] = 0.0
        _add_weighted_segments(seg_v, seg_stride, seg_len, first, end, h, scores, acc_out,
                               itemsize)  # fmt: skip
        for g in range(group):
            for t in range(kk):  # chosen_ids now holds the value rows' addresses
                _add_chosen_rows(chosen_ids[g, t], row_bytes, scores[g, n_dev + t], acc_out[g],
                                 itemsize)  # fmt: skip
        _write_heads(out, lse, b, h, maxes, den, acc_out, out_row)


def _rows_per_sequence(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    cumulative = np.zeros(len(length) + 1, dtype=np.int64)
    np.cumsum(length, out=cumulative[1:])
    return cumulative[start[1:]] - cumulative[start[:-1]]


def split_retrieval_units(
    seg_start: np.ndarray, seg_len: np.ndarray, host_start: np.ndarray, host_len: np.ndarray,
    num_kv_heads: int,
) -> list[int]:  # fmt: skip
    """Unit boundaries [0, ..., units] giving each thread about the same rows to score
    (one range when splitting does not pay)."""
    rows = _rows_per_sequence(seg_start, seg_len) + _rows_per_sequence(host_start, host_len)
    rows = np.repeat(rows, num_kv_heads)
    # scoring every host row and selecting costs more per row than decode attention, so
    # even a 2:1 split of one sequence's 3 heads pays: 8K, batch 1, bf16, server threads,
    # 19.9 ms a step split vs 21.5 unsplit (ad hoc, 2026-12-02)
    parts = thread_parts(len(rows), int(rows.sum()), min_units=1)
    return [0, len(rows)] if parts <= 1 else _split_points(rows, parts)


def retrieval_decode_attention(
    q: torch.Tensor,
    num_kv_heads: int,
    kv_dtype: torch.dtype,
    device_segments: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    host_segments: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    top_k: int,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q [B, Hq, D] over each sequence's device rows and its exact
    top-k host rows per query head, for a batch.

    Each segment set is (start, k_addr, v_addr, stride, length), as in
    `kernels.decode_attention.decode_attention`: sequence b owns segments start[b] ..
    start[b + 1] - 1, segment s being buffers [Hkv, stride[s] / D, D] of `kv_dtype` at
    addresses k_addr[s], v_addr[s] whose rows [0, length[s]) count. Every row of the
    device segments is attended (each sequence needs at least one); of the host segments'
    rows, the top_k by score per query head. Returns (out [B, Hq, D] in `out_dtype`,
    lse [B, Hq] float32), as attention over the device rows merged with attention over
    the chosen host rows would. The caller keeps the buffers alive.
    """
    if kv_dtype not in KERNEL_DTYPES or out_dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"retrieval_decode_attention supports {KERNEL_DTYPES}, got {kv_dtype} and {out_dtype}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    bsz, hq, _ = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads do not group over {num_kv_heads} KV heads")
    for name, segments in (("device", device_segments), ("host", host_segments)):
        if len(segments[0]) != bsz + 1:
            raise ValueError(f"{name} segment starts must have {bsz + 1} entries")
    queries = (q.float() * scale).contiguous()
    out = torch.empty(q.shape, dtype=out_dtype)
    lse = torch.empty((bsz, hq), dtype=torch.float32)
    seg_start, seg_k, seg_v, seg_stride, seg_len = device_segments
    host_start, host_k, host_v, host_stride, host_len = host_segments
    cuts = split_retrieval_units(seg_start, seg_len, host_start, host_len, num_kv_heads)
    itemsize = torch.empty(0, dtype=kv_dtype).element_size()
    args = (queries.numpy(), num_kv_heads, *device_segments, *host_segments, top_k,
            kernel_view(out), lse.numpy())  # fmt: skip
    run_ranges(_retrieval_segments, cuts, *args, after=(itemsize,))
    return out, lse
