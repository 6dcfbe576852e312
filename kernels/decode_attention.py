"""Decode attention for a whole batch in one compiled call (CPU, float32 or bfloat16 KV).

At decode each sequence adds one token per layer, and the per-sequence torch ops (two
small matmuls, a softmax, the KV appends) cost more in dispatch than in arithmetic once
16 sequences share a step. Here one numba kernel appends every sequence's new K/V row
to its own cache buffer and attends over it, (sequence, KV head) by (sequence, KV head),
reading each key row once for all query heads of its GQA group. Arithmetic is in float32.

Each sequence's cache stays a separate tensor [Hkv, capacity, D]; the kernel reaches it
through its address, so nothing is gathered or padded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import carray, njit, types
from numba.extending import intrinsic

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# Sequences per thread below which splitting the batch costs more than it saves.
MIN_SEQS_PER_THREAD = 2
# Serial kernels: numba's workqueue pool stalls for milliseconds when another process
# holds the cores. Large batches are split across Python threads instead (the GIL is
# released), as many as torch's intra-op threads.
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


@njit(inline="always", fastmath=True)
def _softmax_rows(scores, n):
    """In place: each row of scores[:, :n] becomes exp(s - max); returns the row sums."""
    group = scores.shape[0]
    den = np.empty(group, dtype=np.float32)
    for g in range(group):
        m = scores[g, 0]
        for j in range(1, n):
            m = max(m, scores[g, j])
        total = np.float32(0.0)
        for j in range(n):
            p = np.exp(scores[g, j] - m)
            scores[g, j] = p
            total += p
        den[g] = total
    return den


@njit(inline="always", fastmath=True)
def _attend_rows(qg, keys, values, n, scale, out_rows):
    """out_rows[g] = softmax(scale * qg[g] . keys[:n]) @ values[:n], all float32."""
    group, d = qg.shape
    scores = np.empty((group, n), dtype=np.float32)
    for j in range(n):
        for g in range(group):
            acc = np.float32(0.0)
            for i in range(d):
                acc += qg[g, i] * keys[j, i]
            scores[g, j] = acc * scale
    den = _softmax_rows(scores, n)
    acc_out = np.zeros((group, d), dtype=np.float32)
    for j in range(n):
        for g in range(group):
            p = scores[g, j]
            for i in range(d):
                acc_out[g, i] += p * values[j, i]
    for g in range(group):
        for i in range(d):
            out_rows[g, i] = acc_out[g, i] / den[g]


@njit(**_JIT)
def _decode_f32(q, k_new, v_new, k_addr, v_addr, head_stride, lengths, out, scale):
    batch, hq, d = q.shape
    hkv = k_new.shape[1]
    group = hq // hkv
    for work in range(batch * hkv):
        b = work // hkv
        h = work - b * hkv
        n = lengths[b]
        offset = 4 * h * head_stride[b]
        keys = carray(_f32_at(k_addr[b] + offset), (n, d))
        values = carray(_f32_at(v_addr[b] + offset), (n, d))
        keys[n - 1, :] = k_new[b, h]
        values[n - 1, :] = v_new[b, h]
        rows = slice(h * group, (h + 1) * group)
        _attend_rows(q[b, rows], keys, values, n, scale, out[b, rows])


@njit(**_JIT)
def _decode_bf16(q, k_new, v_new, k_addr, v_addr, head_stride, lengths, out, scale):
    """As _decode_f32 for bfloat16 caches seen as uint16 (widened row by row); q and out
    are float32."""
    batch, hq, d = q.shape
    hkv = k_new.shape[1]
    group = hq // hkv
    bits = np.empty(d, dtype=np.uint32)
    row = bits.view(np.float32)
    for work in range(batch * hkv):
        b = work // hkv
        h = work - b * hkv
        n = lengths[b]
        offset = 2 * h * head_stride[b]
        keys = carray(_u16_at(k_addr[b] + offset), (n, d))
        values = carray(_u16_at(v_addr[b] + offset), (n, d))
        keys[n - 1, :] = k_new[b, h]
        values[n - 1, :] = v_new[b, h]
        qg = q[b, h * group : (h + 1) * group]
        scores = np.empty((group, n), dtype=np.float32)
        for j in range(n):
            for i in range(d):
                bits[i] = np.uint32(keys[j, i]) << 16
            for g in range(group):
                acc = np.float32(0.0)
                for i in range(d):
                    acc += qg[g, i] * row[i]
                scores[g, j] = acc * scale
        den = _softmax_rows(scores, n)
        acc_out = np.zeros((group, d), dtype=np.float32)
        for j in range(n):
            for i in range(d):
                bits[i] = np.uint32(values[j, i]) << 16
            for g in range(group):
                p = scores[g, j]
                for i in range(d):
                    acc_out[g, i] += p * row[i]
        for g in range(group):
            for i in range(d):
                out[b, h * group + g, i] = acc_out[g, i] / den[g]


_pool: ThreadPoolExecutor | None = None


def _split_points(lengths: np.ndarray, parts: int) -> list[int]:
    """Batch boundaries giving each part about the same number of KV rows to read."""
    cumulative = np.cumsum(lengths)
    targets = cumulative[-1] * np.arange(1, parts) / parts
    cuts = np.searchsorted(cumulative, targets).tolist()
    return [0] + [min(c + 1, len(lengths)) for c in cuts] + [len(lengths)]


def _raw(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor; bfloat16 is seen as uint16."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_addr: np.ndarray,
    v_addr: np.ndarray,
    head_stride: np.ndarray,
    lengths: np.ndarray,
    scale: float,
) -> torch.Tensor:
    """Append each sequence's new K/V row and attend over its cache, for a batch.

    q [B, Hq, D]; k_new, v_new [B, Hkv, D] in the caches' dtype. Sequence b's cache is
    the contiguous buffer pair at k_addr[b], v_addr[b] shaped [Hkv, head_stride[b] / D, D];
    its new row goes to index lengths[b] - 1 and attention covers rows [0, lengths[b]).
    Returns [B, Hq, D] in q's dtype. The caller keeps the buffers alive and large enough.
    """
    if k_new.dtype not in KERNEL_DTYPES:
        raise ValueError(f"decode_attention supports {KERNEL_DTYPES}, got {k_new.dtype}")
    global _pool
    qf = q.float().contiguous()
    out = torch.empty_like(qf)
    kernel = _decode_bf16 if k_new.dtype == torch.bfloat16 else _decode_f32
    args = (
        qf.numpy(),
        _raw(k_new.contiguous()),
        _raw(v_new.contiguous()),
        k_addr,
        v_addr,
        head_stride,
        lengths,
        out.numpy(),
    )
    parts = min(torch.get_num_threads(), len(lengths) // MIN_SEQS_PER_THREAD)
    if parts <= 1:
        kernel(*args, np.float32(scale))
        return out.to(q.dtype)
    # The kernel releases the GIL: other threads take the later parts of the batch.
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="decode-attention")
    cuts = _split_points(lengths, parts)
    futures = [
        _pool.submit(kernel, *(a[lo:hi] for a in args), np.float32(scale))
        for lo, hi in zip(cuts[1:-1], cuts[2:], strict=True)
        if hi > lo
    ]
    kernel(*(a[: cuts[1]] for a in args), np.float32(scale))
    for future in futures:
        future.result()
    return out.to(q.dtype)
