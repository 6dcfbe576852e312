"""A growable, append-only float32 matrix of keys that several indexes can share.

With GQA, the query heads of one group attend to the same KV head, so their indexes
(one per query head) can all point at one `KeyStore` instead of each holding a copy.
Rows are never modified or removed, so a view of the first `n` rows stays valid after
later appends (growth reallocates; old views keep the old buffer alive).
"""

from __future__ import annotations

import threading

import numpy as np


def as_key_matrix(x: np.ndarray, dim: int, name: str = "keys") -> np.ndarray:
    """Validate a [n, dim] matrix and return it as C-contiguous float32."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


class KeyStore:
    """Append-only [size, dim] float32 rows with amortised (doubling) growth."""

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.dim = dim
        self._buf = np.empty((capacity, dim), dtype=np.float32)
        self._size = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return self._buf.shape[0]

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    def __len__(self) -> int:
        return self._size

    def view(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """Read-only view of rows [start, end) (default: all rows)."""
        end = self._size if end is None else end
        if not 0 <= start <= end <= self._size:
            raise ValueError(f"rows [{start}, {end}) out of range for size {self._size}")
        out = self._buf[start:end]
        out.flags.writeable = False
        return out

    def append(self, keys: np.ndarray) -> int:
        """Append rows; returns the id of the first one."""
        keys = as_key_matrix(keys, self.dim)
        with self._lock:
            return self._append_locked(keys)

    def sync(self, start: int, keys: np.ndarray) -> None:
        """Make rows [start, start + n) hold `keys`.

        Appends them when the store ends at `start`; when a sibling index (or the owner)
        already appended them, checks that they match. This lets every index of a GQA
        group call `add(keys)` with the same keys while the store holds them once.
        """
        keys = as_key_matrix(keys, self.dim)
        n = keys.shape[0]
        with self._lock:
            if self._size == start:
                self._append_locked(keys)
                return
            if self._size < start + n:
                raise ValueError(
                    f"shared KeyStore has {self._size} rows; cannot place {n} keys at {start}"
                )
            rows = self._buf[start : start + n]
            same_memory = rows.__array_interface__["data"][0] == keys.__array_interface__["data"][0]
            if not same_memory and not np.array_equal(rows, keys):
                raise ValueError(
                    f"shared KeyStore rows [{start}, {start + n}) differ from the keys given; "
                    "indexes sharing a store must add the same keys in the same order"
                )

    def _append_locked(self, keys: np.ndarray) -> int:
        start, n = self._size, keys.shape[0]
        if start + n > self.capacity:
            new_cap = max(start + n, 2 * self.capacity, 16)
            buf = np.empty((new_cap, self.dim), dtype=np.float32)
            buf[:start] = self._buf[:start]
            self._buf = buf
        self._buf[start : start + n] = keys
        self._size = start + n
        return start
