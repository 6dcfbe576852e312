"""faiss baselines: flat (exact), IVF and HNSW, all with inner-product metric.

faiss copies the vectors into the index, so these cannot share a `KeyStore`: each one
holds its own copy of the keys (counted in `nbytes`). faiss releases the GIL and
parallelises batched searches with OpenMP.
"""

from __future__ import annotations

import math
import threading

import faiss
import numpy as np

from retrieval.base import KeyIndex, PositiveInt, SearchResult, pad_result, validate_positive
from retrieval.key_store import as_key_matrix

# faiss.cvar.hnsw_stats is one process-wide counter; this keeps reset/search/read atomic.
_HNSW_STATS_LOCK = threading.Lock()


class _FaissIndex(KeyIndex):
    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._index: faiss.Index | None = None

    @property
    def size(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        self._check_build_once()
        self.add(keys)

    def _faiss_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, self.size)
        scores, ids = self._index.search(queries, kk)
        return ids, scores


class FaissFlatIndex(_FaissIndex):
    """faiss IndexFlatIP: exact brute force (scanned = N)."""

    kind = "faiss-flat"

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._index = faiss.IndexFlatIP(dim)

    def add(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        self._index.add(as_key_matrix(keys, self.dim))

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        ids, scores = self._faiss_search(queries, k)
        return pad_result(ids, scores, np.full(len(queries), self.size), k)

    @property
    def nbytes(self) -> int:
        return self.size * self.dim * 4


class FaissIVFIndex(_FaissIndex):
    """faiss IndexIVFFlat (inner product): k-means lists, `nprobe` lists searched per query.

    nlist defaults to round(sqrt(N)) of the keys seen by the first build/add, which also
    trains the centroids; later keys go to the nearest existing list. scanned counts the
    keys in the probed lists (not the nlist centroid comparisons).
    """

    kind = "faiss-ivf"
    tunables = ("nprobe",)
    nprobe = PositiveInt()

    def __init__(self, dim: int, nlist: int | None = None, nprobe: int = 16, seed: int = 1234):
        super().__init__(dim)
        self._nlist = None if nlist is None else validate_positive("nlist", nlist)
        self.nprobe = nprobe
        self._seed = seed
        self._list_sizes = np.zeros(0, dtype=np.int64)

    @property
    def nlist(self) -> int | None:
        return None if self._index is None else int(self._index.nlist)

    def _train(self, keys: np.ndarray) -> None:
        n = keys.shape[0]
        nlist = self._nlist if self._nlist is not None else max(1, round(math.sqrt(n)))
        nlist = min(nlist, n)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # silence faiss' "too few points" warning
        index.cp.seed = self._seed
        index.train(keys)
        self._quantizer = quantizer  # the IVF index does not own its quantizer
        self._index = index
        self._list_sizes = np.zeros(nlist, dtype=np.int64)

    def add(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        keys = as_key_matrix(keys, self.dim)
        if keys.shape[0] == 0:
            return
        if self._index is None:
            self._train(keys)
        _, assign = self._index.quantizer.search(keys, 1)
        self._index.add_core(keys.shape[0], faiss.swig_ptr(keys), None, faiss.swig_ptr(assign))
        self._list_sizes += np.bincount(assign.ravel(), minlength=len(self._list_sizes))

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        nprobe = min(self._nprobe, self._index.nlist)
        self._index.nprobe = nprobe
        kk = min(k, self.size)
        centroid_scores, lists = self._index.quantizer.search(queries, nprobe)
        scores, ids = self._index.search_preassigned(queries, kk, lists, centroid_scores)
        scanned = self._list_sizes[lists].sum(axis=1)
        return pad_result(ids, scores, scanned, k)

    @property
    def nbytes(self) -> int:
        if self._index is None:
            return 0
        return self.size * (self.dim * 4 + 8) + self._index.nlist * self.dim * 4


class FaissHNSWIndex(_FaissIndex):
    """faiss IndexHNSWFlat (inner product), `ef` = efSearch.

    scanned is faiss' distance-computation count (hnsw_stats.ndis) for the batch divided
    by the batch size: a per-batch average, not a per-query count. It includes the
    upper-layer greedy descent, which may score a key again at layer 0, so it is capped
    at the index size.
    """

    kind = "faiss-hnsw"
    tunables = ("ef",)
    ef = PositiveInt()

    def __init__(self, dim: int, M: int = 32, ef_construction: int = 100, ef: int = 100):
        super().__init__(dim)
        self._index = faiss.IndexHNSWFlat(
            dim, validate_positive("M", M), faiss.METRIC_INNER_PRODUCT
        )
        self._index.hnsw.efConstruction = validate_positive("ef_construction", ef_construction)
        self.ef = ef

    def add(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        self._index.add(as_key_matrix(keys, self.dim))

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        self._index.hnsw.efSearch = max(self._ef, k)
        with _HNSW_STATS_LOCK:
            faiss.cvar.hnsw_stats.reset()
            ids, scores = self._faiss_search(queries, k)
            ndis = int(faiss.cvar.hnsw_stats.ndis)
        per_query = min(round(ndis / len(queries)), self.size)
        scanned = np.full(len(queries), per_query, dtype=np.int64)
        return pad_result(ids, scores, scanned, k)

    @property
    def nbytes(self) -> int:
        hnsw = self._index.hnsw
        links = hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8 + hnsw.levels.size() * 4
        return self.size * self.dim * 4 + links
