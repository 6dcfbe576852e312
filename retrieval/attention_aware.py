"""Attention-aware graph index (RoarGraph-style), as used by RetrievalAttention.

Decode queries are out-of-distribution for the keys, so a graph built from key-to-key
proximity (HNSW) leads a query's search astray. This index is built from query -> key
relations instead:

1. For each sample (prefill) query, find its exact top-`kq` keys.
2. Projection: the query's best key gets edges to the query's other top keys (pooled
   over all queries sharing that best key, pruned to `degree`), made two-way.
3. Connectivity: every key is linked (up to `extra_degree` supplementary edges, both
   ways) to the keys a graph search finds for its *guide* query. With guide="query"
   (default) that is the sample query that ranks the key best relative to its own
   top-`kq` cut-off, so a key no sample query put in its top list still lands where
   similar queries search; guide="key" searches with the key itself (RoarGraph's
   connectivity enhancement).

Incremental `add` links new keys the same way, guided by up to `max_guides` stored
sample queries, with no rebuild. Decode queries favour recent keys, which no prefill
query ranked highly, so `add(keys, queries)` should be given the recent decode queries:
they join the guide set (newest kept) and get the projection step (2) online, with
their searched top keys. On real attention this brings keys added after the build to
about the recall of a full build.

Search is a beam search (`ef` candidates) from entry points: the keys that occur most
often in the sample queries' top lists (or the medoid when there are no queries).
`scanned` counts the keys whose score was computed. Vectors are read from a
`KeyStore`, shareable by the indexes of one GQA group. Every key stays reachable from
the entry points (a spanning tree's edges are never removed).
"""

from __future__ import annotations

import numpy as np

from retrieval.base import PositiveInt, SearchResult, StoreBackedIndex, validate_positive
from retrieval.exact import readonly
from retrieval.graph_kernels import (
    add_reverse_projection,
    batch_search,
    in_degrees,
    insert_nodes,
    project,
    project_online,
    repair_reachability,
    spanning_tree,
)
from retrieval.key_store import KeyStore, as_key_matrix
from retrieval.scan_kernels import best_guides

GUIDES = ("query", "key")
_SCORE_BYTES = 64 << 20  # bound on the [chunk, N] score matrix built at once


def sample_topk_and_guides(
    keys: np.ndarray, queries: np.ndarray, kq: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass over queries @ keys.T.

    Returns each query's top-kq key ids [M, kq] (best first), its kq-th best score [M]
    (the cut-off of its top list), and for each key the query that ranks it best
    relative to that cut-off, (score - cut-off) / |q| [N].
    """
    n, m = keys.shape[0], queries.shape[0]
    nn = np.empty((m, kq), dtype=np.int64)
    cutoff = np.empty(m, dtype=np.float32)
    best_margin = np.full(n, -np.inf, dtype=np.float32)
    best_query = np.zeros(n, dtype=np.int64)
    inv_norm = 1.0 / np.maximum(np.linalg.norm(queries, axis=1), 1e-12)
    chunk = max(1, _SCORE_BYTES // (4 * n))
    for lo in range(0, m, chunk):
        hi = min(m, lo + chunk)
        s = queries[lo:hi] @ keys.T
        part = np.argpartition(s, n - kq, axis=1)[:, n - kq :]
        top = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        nn[lo:hi] = np.take_along_axis(part, order, axis=1)
        cutoff[lo:hi] = top.min(axis=1)
        s -= cutoff[lo:hi, None]
        s *= inv_norm[lo:hi, None].astype(np.float32)
        rows = s.argmax(axis=0)
        margin = s[rows, np.arange(n)]
        better = margin > best_margin
        best_margin[better] = margin[better]
        best_query[better] = rows[better] + lo
    return nn, cutoff, best_query


class AttentionAwareIndex(StoreBackedIndex):
    """Graph index built from sample queries' top-k keys; see the module docstring."""

    kind = "attention-aware"
    tunables = ("ef",)
    ef = PositiveInt()

    def __init__(
        self,
        dim: int,
        store: KeyStore | None = None,
        kq: int = 32,
        degree: int = 32,
        extra_degree: int = 32,
        ef: int = 64,
        build_ef: int = 64,
        num_entries: int = 4,
        max_queries: int = 4096,
        max_guides: int = 1024,
        guide: str = "query",
        seed: int = 0,
    ) -> None:
        super().__init__(dim, store)
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
        self.kq = validate_positive("kq", kq)
        self.degree = validate_positive("degree", degree)
        self.extra_degree = validate_positive("extra_degree", extra_degree)
        self.build_ef = validate_positive("build_ef", build_ef)
        self.num_entries = validate_positive("num_entries", num_entries)
        self.max_queries = validate_positive("max_queries", max_queries)
        self.max_guides = validate_positive("max_guides", max_guides)
        self.guide = guide
        self.seed = seed
        self.ef = ef
        self._adj = np.zeros((0, self.degree + self.extra_degree), dtype=np.int32)
        self._pdeg = np.zeros(0, dtype=np.int32)
        self._sdeg = np.zeros(0, dtype=np.int32)
        self._indeg = np.zeros(0, dtype=np.int32)
        self._parent = np.zeros(0, dtype=np.int64)
        self._entries = np.zeros(0, dtype=np.int64)
        # Sample queries kept to guide incremental adds, with their top-list cut-offs.
        self._guide_q = np.zeros((0, dim), dtype=np.float32)
        self._guide_cutoff = np.zeros(0, dtype=np.float32)

    @property
    def entries(self) -> np.ndarray:
        return self._entries

    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        self._check_build_once()
        if queries is not None:
            queries = as_key_matrix(queries, self.dim, "queries")
        _, n = self._ingest(keys)
        if n == 0:
            return
        self._reserve(n)
        keys = self.store.view(0, n)
        guides = keys
        if queries is not None and len(queries) > 0:
            queries = self._sample(queries)
            nn, cutoff, best_query = sample_topk_and_guides(keys, queries, min(self.kq, n))
            if nn.shape[1] > 1:
                order = np.argsort(nn[:, 0], kind="stable")
                project(keys, nn, order, self._adj, self._pdeg, self.degree)
                add_reverse_projection(keys, self._adj, self._pdeg, self.degree, n)
            counts = np.bincount(nn.ravel(), minlength=n)
            top = np.argsort(-counts, kind="stable")[: self.num_entries]
            self._entries = top[counts[top] > 0].astype(np.int64)
            if self.guide == "query":
                guides = readonly(queries[best_query])
                keep = np.random.default_rng(self.seed).permutation(len(queries))
                keep = np.sort(keep[: self.max_guides])
                self._guide_q, self._guide_cutoff = readonly(queries[keep]), cutoff[keep]
        else:
            centroid = keys.mean(axis=0)
            medoid = int(np.argmin(((keys - centroid) ** 2).sum(axis=1)))
            self._entries = np.array([medoid], dtype=np.int64)
        self._indeg = in_degrees(self._adj, self._pdeg, self._sdeg, self.degree, n)
        self._link(keys, guides, 0, n, track_parents=False)
        repair_reachability(
            keys, self._adj, self._pdeg, self._sdeg, self._indeg, self.degree,
            self.extra_degree, self._entries, self.build_ef, 3,
        )  # fmt: skip
        seen, parent = spanning_tree(
            self._adj, self._pdeg, self._sdeg, self.degree, self._entries, n
        )
        self._parent[:n] = parent
        # Keys the repair could not reach (normally none) become entry points.
        self._entries = np.concatenate([self._entries, np.flatnonzero(~seen)])

    def add(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        if queries is not None:
            queries = as_key_matrix(queries, self.dim, "queries")
            if len(queries) == 0:
                queries = None
        start, end = self._ingest(keys)
        if end == start:
            return
        if queries is not None and self.guide == "query" and start > 0:
            self._add_guides(queries)
        self._reserve(end)
        if len(self._entries) == 0:
            self._entries = np.array([start], dtype=np.int64)
        keys = self.store.view(0, end)
        guides = keys[start:end]
        if len(self._guide_q):
            guides = readonly(self._guide_q[self._best_guides(guides)])
        self._link(keys, guides, start, end, track_parents=True)
        if queries is not None:
            top = self._search(queries, min(self.kq, end)).ids
            project_online(
                keys, top, self._adj, self._pdeg, self._sdeg, self._indeg, self._parent,
                self.degree,
            )  # fmt: skip

    def _best_guides(self, keys: np.ndarray) -> np.ndarray:
        """For each key, the guide query that ranks it best relative to its cut-off."""
        return best_guides(self._guide_q, self._guide_cutoff, keys)

    def _add_guides(self, queries: np.ndarray) -> None:
        """Append recent queries to the guide set (dropping the oldest beyond max_guides)."""
        cutoff = self._search(queries, min(self.kq, self._size)).scores[:, -1]
        queries, cutoff = queries[np.isfinite(cutoff)], cutoff[np.isfinite(cutoff)]
        self._guide_q = readonly(np.concatenate([self._guide_q, queries])[-self.max_guides :])
        self._guide_cutoff = np.concatenate([self._guide_cutoff, cutoff])[-self.max_guides :]

    def _link(self, keys, guides, start: int, end: int, track_parents: bool) -> None:
        orphans = np.empty(end - start if track_parents else 0, dtype=np.int64)
        n_orphans = insert_nodes(
            keys, guides, self._adj, self._pdeg, self._sdeg, self._indeg, self._parent,
            self.degree, self.extra_degree, self._entries, self.build_ef, start, end, orphans,
        )  # fmt: skip
        if n_orphans:  # every neighbour's edges were protected: make them entry points
            self._entries = np.concatenate([self._entries, orphans[:n_orphans]])
        self._size = end

    def _sample(self, queries: np.ndarray) -> np.ndarray:
        if len(queries) <= self.max_queries:
            return queries
        rng = np.random.default_rng(self.seed)
        return queries[np.sort(rng.choice(len(queries), self.max_queries, replace=False))]

    def _reserve(self, n: int) -> None:
        cap = self._adj.shape[0]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 64)
        adj = np.zeros((new_cap, self._adj.shape[1]), dtype=np.int32)
        adj[:cap] = self._adj
        self._adj = adj
        self._pdeg, self._sdeg, self._indeg = (
            np.concatenate([a, np.zeros(new_cap - cap, dtype=np.int32)])
            for a in (self._pdeg, self._sdeg, self._indeg)
        )
        self._parent = np.concatenate([self._parent, np.full(new_cap - cap, -1, dtype=np.int64)])

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        ids, scores, scanned = batch_search(
            readonly(queries), self.keys(), self._adj, self._pdeg, self._sdeg, self.degree,
            self._entries, max(self._ef, k), k,
        )  # fmt: skip
        return SearchResult(ids=ids, scores=scores, scanned=scanned)

    def degrees(self) -> np.ndarray:
        """Out-degree of each indexed key (projection + supplementary edges)."""
        return (self._pdeg[: self._size] + self._sdeg[: self._size]).astype(np.int64)

    def reachable(self) -> np.ndarray:
        """Boolean [size]: keys reachable from the entry points (diagnostic)."""
        seen, _ = spanning_tree(
            self._adj, self._pdeg, self._sdeg, self.degree, self._entries, self._size
        )
        return seen

    @property
    def nbytes(self) -> int:
        arrays = (
            self._adj, self._pdeg, self._sdeg, self._indeg, self._parent, self._entries,
            self._guide_q, self._guide_cutoff,
        )  # fmt: skip
        return sum(a.nbytes for a in arrays) + self._store_nbytes()
