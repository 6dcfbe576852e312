"""The attention backend interface the models call for every layer.

A model computes q, k, v for the packed tokens of a step (after RoPE) and hands them to
the backend together with the step's `ForwardContext`. The backend owns the KV cache:
it stores the new k, v in each sequence's cache and returns the attention output.
Models never look inside a cache, so the full and the tiered (RetrievalAttention)
backends are interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.forward_context import ForwardContext


@dataclass(frozen=True)
class CacheShape:
    """Geometry of a model's KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")


class AttentionBackend(ABC):
    """Stores KV and computes causal attention for packed, ragged batches."""

    def __init__(self, shape: CacheShape) -> None:
        self.shape = shape

    @abstractmethod
    def new_cache(self) -> object:
        """A fresh, empty per-sequence cache handle."""

    @abstractmethod
    def free(self, cache: object) -> None:
        """Release every byte the cache holds."""

    @abstractmethod
    def fork(self, cache: object) -> object:
        """An independent copy of a cache: appending to one never changes the other."""

    @abstractmethod
    def cache_len(self, cache: object) -> int:
        """Number of tokens stored in the cache."""

    @abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: ForwardContext,
        scale: float,
    ) -> torch.Tensor:
        """Append k, v to each sequence's cache and attend.

        q: [T, Hq, D]; k, v: [T, Hkv, D] for the packed new tokens of the step.
        Returns [T, Hq, D]. Token i of a sequence attends to every cached token of that
        sequence and to new tokens up to and including itself. The layer's last call in
        a step is layer == num_layers - 1; caches count their tokens after it.
        """

    # -- prefix-cache snapshots (see engine/prefix_cache.py) ----------------------------

    def freeze(self, cache: object) -> object:
        """Turn the cache's contents into an immutable snapshot (with `length` and
        `nbytes()`); the cache continues as a child of it. Avoids copying where it can."""
        raise NotImplementedError(f"{type(self).__name__} has no prefix-cache snapshots")

    def freeze_nbytes(self, cache: object) -> int:
        """Bytes `freeze(cache)` would hand to the snapshot."""
        raise NotImplementedError(f"{type(self).__name__} has no prefix-cache snapshots")

    def plan_freeze(self, cache: object, length: int) -> None:  # noqa: B027 - optional hint
        """Hint: the cache will be frozen at `length` tokens; size buffers for that."""

    def child(self, snapshot: object) -> object:
        """A new cache holding the snapshot's tokens, copy-on-write: appending to it never
        changes the snapshot or another child."""
        raise NotImplementedError(f"{type(self).__name__} has no prefix-cache snapshots")

    def release_snapshot(self, snapshot: object) -> None:
        """Drop what the snapshot holds; no child of it may still be live."""
        raise NotImplementedError(f"{type(self).__name__} has no prefix-cache snapshots")

    def device_tokens_for(self, total_len: int, num_new: int) -> int:
        """Device-tier tokens a sequence of `total_len` tokens occupies during a step that
        adds `num_new` of them. The full backend keeps everything on the device."""
        return total_len

    def memory_stats(self) -> dict[str, int]:
        """Bytes and tokens held, by tier. Backends override to report more."""
        return {}
