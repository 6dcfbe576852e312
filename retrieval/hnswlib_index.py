"""hnswlib baseline (space 'ip'). hnswlib copies the vectors into its own graph storage.

hnswlib does not expose how many distances a search computed, so `scanned` is -1
("not reported"); compare its recall against faiss-hnsw's counted cost instead.
"""

from __future__ import annotations

import hnswlib
import numpy as np

from retrieval.base import KeyIndex, PositiveInt, SearchResult, pad_result, validate_positive
from retrieval.key_store import as_key_matrix


class HnswlibIndex(KeyIndex):
    """hnswlib HNSW graph with inner-product space; `ef` tunes search effort.

    num_threads is hnswlib's own thread count for add/search (1 keeps builds
    deterministic; parallelise across indexes with `build_indexes` instead).
    """

    kind = "hnswlib"
    tunables = ("ef",)
    ef = PositiveInt()

    def __init__(
        self,
        dim: int,
        M: int = 16,
        ef_construction: int = 100,
        ef: int = 100,
        num_threads: int = 1,
        seed: int = 100,
        initial_capacity: int = 1024,
    ) -> None:
        super().__init__(dim)
        self._M = validate_positive("M", M)
        self._num_threads = validate_positive("num_threads", num_threads)
        self._index = hnswlib.Index(space="ip", dim=dim)
        self._index.init_index(
            max_elements=validate_positive("initial_capacity", initial_capacity),
            ef_construction=validate_positive("ef_construction", ef_construction),
            M=self._M,
            random_seed=seed,
        )
        self.ef = ef

    @property
    def size(self) -> int:
        return int(self._index.get_current_count())

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        self._check_build_once()
        self.add(keys)

    def add(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        keys = as_key_matrix(keys, self.dim)
        n = keys.shape[0]
        if n == 0:
            return
        start = self.size
        capacity = self._index.get_max_elements()
        if start + n > capacity:
            self._index.resize_index(max(start + n, 2 * capacity))
        ids = np.arange(start, start + n, dtype=np.int64)
        self._index.add_items(keys, ids, num_threads=self._num_threads)

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        kk = min(k, self.size)
        self._index.set_ef(max(self._ef, kk))
        labels, distances = self._index.knn_query(queries, k=kk, num_threads=self._num_threads)
        # hnswlib's 'ip' distance is 1 - <q, k>.
        scores = (1.0 - distances).astype(np.float32)
        scanned = np.full(len(queries), -1, dtype=np.int64)
        return pad_result(labels.astype(np.int64), scores, scanned, k)

    @property
    def nbytes(self) -> int:
        # Estimate from hnswlib's layout: vector + level-0 links (2M) + label per slot.
        per_slot = self.dim * 4 + (2 * self._M + 1) * 4 + 8
        return self._index.get_max_elements() * per_slot
