"""A bank of LoFiT adapters applied per token, so rows with different adapters share a batch.

Each registered adapter owns a slot id >= 1; slot 0 is "no adapter" (A = v = 0, the
identity). For every layer where some adapter has heads, the bank stacks `A` and `v` as
[n_slots, num_heads, head_dim] tensors; a step gathers each token's row by its slot id.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.forward_context import ForwardContext
from engine.lofit_adapter import LofitAdapter
from engine.model_config import ModelConfig

HeadHook = Callable[[int, torch.Tensor], torch.Tensor]


class LofitBank:
    """Registered adapters by name, stacked per layer for a per-token gather."""

    def __init__(
        self, model_config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> None:
        self.model_config = model_config
        self.dtype = dtype
        self.device = torch.device(device)
        self.slots: dict[str, int] = {}
        self._adapters: dict[int, LofitAdapter] = {}
        self.A: dict[int, torch.Tensor] = {}  # layer -> [n_slots, Hq, D]
        self.v: dict[int, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def names(self) -> list[str]:
        return sorted(self.slots)

    def slot(self, name: str) -> int:
        """The slot id of adapter `name`; ValueError naming `lofit` if unknown."""
        if name not in self.slots:
            known = ", ".join(self.names()) or "none"
            raise ValueError(f"lofit adapter {name!r} is not loaded (loaded: {known})")
        return self.slots[name]

    def register(self, name: str, adapter: LofitAdapter) -> int:
        """Add `adapter` under `name`; returns its slot id (the lowest free one >= 1)."""
        if not isinstance(name, str) or not name:
            raise ValueError("lofit adapter name must be a non-empty string")
        if name in self.slots:
            raise ValueError(f"lofit adapter {name!r} is already loaded")
        adapter.validate(self.model_config)
        slot = next(i for i in range(1, len(self._adapters) + 2) if i not in self._adapters)
        self.slots[name] = slot
        self._adapters[slot] = adapter
        self._rebuild()
        return slot

    def unregister(self, name: str) -> None:
        """Drop adapter `name` and free its slot. The caller makes sure nothing uses it."""
        slot = self.slot(name)
        del self.slots[name]
        del self._adapters[slot]
        self._rebuild()

    def _rebuild(self) -> None:
        c = self.model_config
        n_slots = max(self._adapters, default=0) + 1
        layers = sorted({layer for a in self._adapters.values() for layer, _ in a.heads})
        shape = (n_slots, c.num_heads, c.head_dim)
        kw = {"dtype": self.dtype, "device": self.device}
        A = {layer: torch.zeros(shape, **kw) for layer in layers}
        v = {layer: torch.zeros(shape, **kw) for layer in layers}
        for slot, adapter in self._adapters.items():
            for i, (layer, head) in enumerate(adapter.heads):
                A[layer][slot, head] = adapter.A[i]
                v[layer][slot, head] = adapter.v[i]
        self.A, self.v = A, v

    def hook(self, ctx: ForwardContext) -> HeadHook | None:
        """The head-output hook for `ctx.adapter_slots` ([T] slot ids), or None when no
        token of the step has an adapter (the model then runs untouched)."""
        slots = ctx.adapter_slots
        if slots is None or not self.A or not bool(slots.any()):
            return None
        A, v = self.A, self.v

        def apply(layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer not in A:
                return h
            # h: [T, Hq, D]; slot 0 gathers zeros, so rows without an adapter are exact.
            return torch.addcmul(v[layer][slots], h, A[layer][slots] + 1)

        return apply
