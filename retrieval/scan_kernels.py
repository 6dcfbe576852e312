"""Single-threaded (numba, nogil) brute-force scans for small batches.

Multithreaded BLAS (numpy's and torch's) stalls for milliseconds on small products when
another process competes for the cores; a decode step issues many such small calls (one
per head), so they run here, one thread each, and parallelise across heads instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from retrieval.graph_kernels import _dot, argsort_desc

_JIT = dict(nogil=True, cache=True)


@njit(**_JIT)
def _heap_sift(vals, ids, root, size):
    """Restore the min-heap property of (vals, ids)[:size] below `root`."""
    while True:
        child = 2 * root + 1
        if child >= size:
            return
        if child + 1 < size and vals[child + 1] < vals[child]:
            child += 1
        if vals[child] < vals[root]:
            vals[root], vals[child] = vals[child], vals[root]
            ids[root], ids[child] = ids[child], ids[root]
            root = child
        else:
            return


@njit(**_JIT)
def scan_topk(queries, keys, k):
    """Exact top-k inner products for each query: ids [B, k] and scores, best first.

    Requires 1 <= k <= len(keys).
    """
    batch = queries.shape[0]
    ids = np.empty((batch, k), dtype=np.int64)
    scores = np.empty((batch, k), dtype=np.float32)
    heap_v = np.empty(k, dtype=np.float32)
    heap_i = np.empty(k, dtype=np.int64)
    for b in range(batch):
        q = queries[b]
        for j in range(k):
            heap_v[j] = _dot(keys, j, q)
            heap_i[j] = j
        for root in range(k // 2 - 1, -1, -1):
            _heap_sift(heap_v, heap_i, np.int64(root), k)
        for j in range(k, keys.shape[0]):
            s = _dot(keys, j, q)
            if s > heap_v[0]:
                heap_v[0] = s
                heap_i[0] = j
                _heap_sift(heap_v, heap_i, np.int64(0), k)
        order = argsort_desc(heap_v)
        for j in range(k):
            ids[b, j] = heap_i[order[j]]
            scores[b, j] = heap_v[order[j]]
    return ids, scores


@njit(**_JIT)
def best_guides(guides, cutoff, keys):
    """For each key, the guide query maximising (<g, key> - cutoff[g]) / |g|."""
    inv_norm = np.empty(guides.shape[0], dtype=np.float32)
    for g in range(guides.shape[0]):
        inv_norm[g] = 1.0 / max(np.sqrt(_dot(guides, g, guides[g])), 1e-12)
    out = np.zeros(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        best = -np.inf
        key = keys[i]
        for g in range(guides.shape[0]):
            margin = (_dot(guides, g, key) - cutoff[g]) * inv_norm[g]
            if margin > best:
                best = margin
                out[i] = g
    return out
