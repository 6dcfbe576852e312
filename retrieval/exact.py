"""Exact top-k by brute force: the ground truth every other index is measured against."""

from __future__ import annotations

import numpy as np
import torch

from retrieval.base import SearchResult, StoreBackedIndex, pad_result
from retrieval.key_store import KeyStore
from retrieval.scan_kernels import scan_topk

# Rows of the [chunk, N] score matrix computed at once, to bound temporary memory.
_SCORE_BYTES = 64 << 20
# Up to this many queries, scan single-threaded instead of calling multithreaded BLAS.
_SMALL_BATCH = 32


def readonly(x: np.ndarray) -> np.ndarray:
    """A read-only, C-contiguous float32 view (numba kernels compile once for these)."""
    x = np.ascontiguousarray(x, dtype=np.float32).view()
    x.flags.writeable = False
    return x


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """A float32 tensor sharing x's memory (a read-only x is only read)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not x.flags.writeable:
        x = x.view()
        try:
            x.flags.writeable = True  # torch warns on read-only arrays; it never writes here
        except ValueError:
            x = x.copy()
    return torch.from_numpy(x)


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products: ids [B, min(k, N)] int64 and scores, best first.

    Small batches run single-threaded in numba (see scan_kernels); large ones as one
    torch matmul + topk per chunk of queries.
    """
    n = keys.shape[0]
    kk = min(k, n)
    batch = queries.shape[0]
    if kk > 0 and batch <= _SMALL_BATCH:
        return scan_topk(readonly(queries), readonly(keys), kk)
    ids = np.empty((batch, kk), dtype=np.int64)
    scores = np.empty((batch, kk), dtype=np.float32)
    if kk == 0:
        return ids, scores
    keys_t, queries_t = as_tensor(keys), as_tensor(queries)
    chunk = max(1, _SCORE_BYTES // (4 * n))
    with torch.inference_mode():
        for lo in range(0, batch, chunk):
            top = torch.topk(queries_t[lo : lo + chunk] @ keys_t.T, kk, dim=1, sorted=True)
            ids[lo : lo + chunk] = top.indices.numpy()
            scores[lo : lo + chunk] = top.values.numpy()
    return ids, scores


class ExactIndex(StoreBackedIndex):
    """Brute-force scan of every key (scanned = N). Holds no vectors of its own."""

    kind = "exact"

    def __init__(self, dim: int, store: KeyStore | None = None) -> None:
        super().__init__(dim, store)

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        self._check_build_once()
        self.add(keys)

    def add(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        _, self._size = self._ingest(keys)

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        ids, scores = exact_topk(self.keys(), queries, k)
        scanned = np.full(queries.shape[0], self._size, dtype=np.int64)
        return pad_result(ids, scores, scanned, k)

    @property
    def nbytes(self) -> int:
        return self._store_nbytes()
