"""The interface every key index implements: top-k inner-product search over one head's keys."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from retrieval.key_store import KeyStore, as_key_matrix


@dataclass
class SearchResult:
    """Top-k answer for a batch of B queries.

    ids: [B, k] int64, best first, -1 where fewer than k keys exist (or were found).
    scores: [B, k] float32 inner products, -inf at padded slots.
    scanned: [B] int64 keys whose score was computed for that query (-1: not reported).
    """

    ids: np.ndarray
    scores: np.ndarray
    scanned: np.ndarray


def empty_result(batch: int, k: int) -> SearchResult:
    """A result with every slot padded."""
    return SearchResult(
        ids=np.full((batch, k), -1, dtype=np.int64),
        scores=np.full((batch, k), -np.inf, dtype=np.float32),
        scanned=np.zeros(batch, dtype=np.int64),
    )


def pad_result(ids: np.ndarray, scores: np.ndarray, scanned: np.ndarray, k: int) -> SearchResult:
    """Widen [B, k'] ids/scores (k' <= k) to [B, k]; marks negative ids as padding."""
    batch, width = ids.shape
    out = empty_result(batch, k)
    out.ids[:, :width] = ids
    out.scores[:, :width] = scores
    pad = out.ids < 0
    out.ids[pad] = -1
    out.scores[pad] = -np.inf
    out.scanned[:] = scanned
    return out


class KeyIndex(ABC):
    """Top-k inner-product search over one KV head's keys, for one or more query heads.

    Ids are row numbers in insertion order: `build` indexes rows 0..N-1 and each `add`
    continues from `size`. An index allows one writer; callers must not `add` while
    another thread searches the same index.
    """

    kind: ClassVar[str] = ""
    # Search-effort parameters settable through `configure` (e.g. "nprobe", "ef").
    tunables: ClassVar[tuple[str, ...]] = ()
    uses_seeds: ClassVar[bool] = False  # whether search() starts from given seed ids

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim

    @abstractmethod
    def build(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """Index `keys` [N, D]; `queries` [M, D] is a sample of prefill queries.

        Only the attention-aware index uses the queries; the others ignore them. Call
        once, on an empty index.
        """

    @abstractmethod
    def add(self, keys: np.ndarray, queries: np.ndarray | None = None) -> None:
        """Index more keys [n, D] incrementally (no rebuild); their ids continue from size.

        `queries` [m, D]: optional recent queries (e.g. the decode queries since the last
        add). The attention-aware index learns from them where the new keys belong
        (which matters: decode queries favour recent keys); the others ignore them.
        """

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Search with validated queries [B, D] float32 and k >= 1 on a non-empty index."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of keys indexed."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Approximate memory held, excluding a KeyStore shared with other indexes."""

    def search(self, queries: np.ndarray, k: int, seeds: np.ndarray | None = None) -> SearchResult:
        """Top-k keys by inner product for each query [B, D].

        `seeds` [B, S]: optional key ids per query where its search may start (-1 pads),
        e.g. the same head's result at the previous decode step, whose top keys overlap
        the next step's by about half. A hint: only indexes with `uses_seeds` read it.
        """
        queries = as_key_matrix(queries, self.dim, "queries")
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        k = int(k)
        if self.size == 0 or queries.shape[0] == 0:
            return empty_result(queries.shape[0], k)
        if seeds is None or not self.uses_seeds:
            return self._search(queries, k)
        seeds = np.ascontiguousarray(seeds, dtype=np.int64)
        if seeds.ndim != 2 or seeds.shape[0] != queries.shape[0]:
            raise ValueError(f"seeds must be [{queries.shape[0]}, S], got {seeds.shape}")
        if seeds.size and (seeds.min() < -1 or seeds.max() >= self.size):
            raise ValueError(f"seed ids must be -1 or in [0, {self.size})")
        return self._search(queries, k, seeds)

    def configure(self, **params: int) -> None:
        """Set search-effort parameters, e.g. `configure(ef=200)` or `configure(nprobe=16)`."""
        for name, value in params.items():
            if name not in self.tunables:
                raise ValueError(
                    f"{self.kind} index has no parameter {name!r}; tunable: {list(self.tunables)}"
                )
            setattr(self, name, value)

    def _check_build_once(self) -> None:
        if self.size:
            raise ValueError(f"{self.kind} index already holds {self.size} keys; build it once")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, size={self.size})"


class StoreBackedIndex(KeyIndex):
    """An index that reads its vectors from a `KeyStore`, possibly shared with siblings.

    Without `store`, the index creates a private one (and counts it in `nbytes`).
    """

    def __init__(self, dim: int, store: KeyStore | None = None) -> None:
        super().__init__(dim)
        if store is not None and store.dim != dim:
            raise ValueError(f"store dim {store.dim} != index dim {dim}")
        self._own_store = store is None
        self.store = store if store is not None else KeyStore(dim)
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def keys(self) -> np.ndarray:
        """The indexed rows [size, D] of the store."""
        return self.store.view(0, self._size)

    def _ingest(self, keys: np.ndarray) -> tuple[int, int]:
        """Place `keys` at rows [size, size + n) of the store; returns (start, end)."""
        keys = as_key_matrix(keys, self.dim)
        start = self._size
        self.store.sync(start, keys)
        return start, start + keys.shape[0]

    def _store_nbytes(self) -> int:
        return self.store.nbytes if self._own_store else 0


def validate_positive(name: str, value: int) -> int:
    """Check that an option is a positive int."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class PositiveInt:
    """A search-effort attribute (ef, nprobe) validated as a positive int when set.

    The value lives in `_<name>` on the instance, where the search code reads it.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj: object, owner: type | None = None) -> int:
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj: object, value: int) -> None:
        setattr(obj, self.slot, validate_positive(self.name, value))
