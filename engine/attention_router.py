"""Route each sequence of a packed step to the backend of its attention mode.

A server may run `full`, `retrieval` and `streaming` sequences in one batch; the model
sees a single backend, this router, which splits the step by mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention_backend import AttentionBackend, CacheShape
from engine.forward_context import ForwardContext, SequenceSlice


class AttentionRouter(AttentionBackend):
    """Holds one backend per attention mode and dispatches caches to their owner."""

    def __init__(
        self,
        shape: CacheShape,
        factory: Callable[[str], AttentionBackend],
        modes: list[str],
    ) -> None:
        if not modes:
            raise ValueError("at least one attention mode is required")
        super().__init__(shape)
        self.modes = list(modes)  # the first is the default
        self.backends: dict[str, AttentionBackend] = {}
        self._factory = factory
        self._owner: dict[int, AttentionBackend] = {}

    def backend(self, mode: str) -> AttentionBackend:
        """The backend of `mode`, created on first use."""
        if mode not in self.modes:
            raise ValueError(f"attention mode {mode!r} is not enabled; enabled: {self.modes}")
        if mode not in self.backends:
            self.backends[mode] = self._factory(mode)
        return self.backends[mode]

    def new_cache(self, mode: str | None = None) -> object:
        backend = self.backend(mode or self.modes[0])
        cache = backend.new_cache()
        self._owner[id(cache)] = backend
        return cache

    def fork(self, cache: object) -> object:
        backend = self.owner(cache)
        copy = backend.fork(cache)
        self._owner[id(copy)] = backend
        return copy

    def child(self, mode: str, snapshot: object) -> object:
        """A copy-on-write child cache of a prefix-cache snapshot of `mode`'s backend."""
        backend = self.backend(mode)
        cache = backend.child(snapshot)
        self._owner[id(cache)] = backend
        return cache

    def owner(self, cache: object) -> AttentionBackend:
        return self._owner[id(cache)]

    def free(self, cache: object) -> None:
        backend = self._owner.pop(id(cache))
        backend.free(cache)

    def cache_len(self, cache: object) -> int:
        return self.owner(cache).cache_len(cache)

    def device_tokens_for_cache(self, cache: object, total_len: int, num_new: int) -> int:
        return self.owner(cache).device_tokens_for(total_len, num_new)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: ForwardContext,
        scale: float,
    ) -> torch.Tensor:
        groups: dict[int, list[SequenceSlice]] = {}
        for s in ctx.slices:
            groups.setdefault(id(self._owner[id(s.cache)]), []).append(s)
        if len(groups) == 1:
            return self._owner[id(ctx.slices[0].cache)].forward(layer, q, k, v, ctx, scale)
        out = torch.empty_like(q)
        for slices in groups.values():
            backend = self._owner[id(slices[0].cache)]
            rows = torch.cat([torch.arange(s.start, s.end) for s in slices])
            sub_slices, offset = [], 0
            for s in slices:
                sub_slices.append(SequenceSlice(s.cache, offset, s.num_new, s.num_cached))
                offset += s.num_new
            sub_ctx = ForwardContext(
                slices=sub_slices,
                backend=backend,
                seq_len_per_token=None,
                head_output_hooks=ctx.head_output_hooks,
                mlp_act_hooks=ctx.mlp_act_hooks,
            )
            out[rows] = backend.forward(layer, q[rows], k[rows], v[rows], sub_ctx, scale)
        return out

    def memory_stats(self) -> dict[str, int]:
        total = dict.fromkeys(("device_bytes", "device_tokens", "host_bytes", "host_tokens"), 0)
        for backend in list(self.backends.values()):
            for key, value in backend.memory_stats().items():
                total[key] = total.get(key, 0) + value
        return total
