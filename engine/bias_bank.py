"""Loaded bias profiles, applied per request so corrected and plain rows share a batch.

A request's `bias_correction` is `"anchored"`, `"prior"` or either with a profile name
(`"anchored:<profile>"`). Each (correction, profile) pair owns a slot id >= 1; slot 0
is "no correction". Per layer the bank stacks the anchored corrections by slot: MLP
activation scales [n_slots, intermediate] (ones elsewhere) and head-output offsets
[n_slots, heads, head_dim] (zeros elsewhere), and each packed token gathers its slot's
row, so rows of slot 0 are multiplied by exactly 1 and offset by exactly 0. Prior slots
add a logit bias on the letter tokens of the rows that sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.bias_profile import BiasProfile
from engine.forward_context import ForwardContext
from engine.model_config import ModelConfig

MODES = ("anchored", "prior")
DEFAULT_PROFILE = "default"

Hook = Callable[[int, torch.Tensor], torch.Tensor]


class BiasBank:
    """Registered profiles by name and their corrections stacked by slot."""

    def __init__(
        self, model_config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> None:
        self.model_config = model_config
        self.dtype = dtype
        self.device = torch.device(device)
        self.profiles: dict[str, BiasProfile] = {}
        self.slots: dict[str, int] = {}  # "anchored:<name>" / "prior:<name>" -> slot
        self.scales: dict[int, torch.Tensor] = {}  # layer -> [n_slots, intermediate]
        self.offsets: dict[int, torch.Tensor] = {}  # layer -> [n_slots, heads, head_dim]
        self.logit_bias: torch.Tensor | None = None  # [n_slots, vocab] float32
        self.anchored_slots: set[int] = set()

    def __len__(self) -> int:
        return len(self.profiles)

    def names(self) -> list[str]:
        return sorted(self.profiles)

    def resolve(self, spec: str) -> str:
        """The canonical `"<mode>:<profile>"` for a request's `bias_correction`; ValueError
        (naming `bias_correction`) for a malformed spec or a profile that is not loaded."""
        if not isinstance(spec, str):
            raise ValueError("bias_correction must be a string")
        mode, _, name = spec.partition(":")
        if mode not in MODES:
            raise ValueError(
                f"bias_correction must be 'anchored', 'prior', 'anchored:<profile>' or "
                f"'prior:<profile>', got {spec!r}"
            )
        known = ", ".join(self.names()) or "none"
        if not name:
            if DEFAULT_PROFILE in self.profiles:
                name = DEFAULT_PROFILE
            elif len(self.profiles) == 1:
                (name,) = self.profiles
            else:
                raise ValueError(
                    f"bias_correction {spec!r} needs a profile name when the server has "
                    f"{len(self.profiles)} bias profiles (loaded: {known}); use '{mode}:<profile>'"
                )
        if name not in self.profiles:
            raise ValueError(f"bias_correction profile {name!r} is not loaded (loaded: {known})")
        return f"{mode}:{name}"

    def slot(self, spec: str) -> int:
        """The slot id for a request's `bias_correction` (see `resolve`)."""
        return self.slots[self.resolve(spec)]

    def register(self, name: str, profile: BiasProfile) -> None:
        """Add `profile` under `name` (its anchored and prior corrections get a slot each)."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError("bias profile name must be a non-empty string without ':'")
        if name in self.profiles:
            raise ValueError(f"bias profile {name!r} is already loaded")
        profile.validate(self.model_config)
        self.profiles[name] = profile
        self._rebuild()

    def unregister(self, name: str) -> None:
        """Drop profile `name`. The caller makes sure no request uses it."""
        if name not in self.profiles:
            raise ValueError(f"bias profile {name!r} is not loaded")
        del self.profiles[name]
        self._rebuild()

    def _rebuild(self) -> None:
        c = self.model_config
        kw = {"dtype": self.dtype, "device": self.device}
        keys = [f"{mode}:{name}" for name in sorted(self.profiles) for mode in MODES]
        self.slots = {key: i + 1 for i, key in enumerate(keys)}
        n_slots = len(keys) + 1
        scales: dict[int, torch.Tensor] = {}
        offsets: dict[int, torch.Tensor] = {}
        logit_bias = torch.zeros(n_slots, c.vocab_size, device=self.device)
        for name, p in self.profiles.items():
            slot = self.slots[f"anchored:{name}"]
            for (layer, index), s in zip(p.neurons, p.neuron_scales.tolist(), strict=True):
                if layer not in scales:
                    scales[layer] = torch.ones(n_slots, c.intermediate_size, **kw)
                scales[layer][slot, index] = s
            for (layer, head), v in zip(p.heads, p.head_offsets, strict=True):
                if layer not in offsets:
                    offsets[layer] = torch.zeros(n_slots, c.num_heads, c.head_dim, **kw)
                offsets[layer][slot, head] = v.to(**kw)
            prior_slot = self.slots[f"prior:{name}"]
            for token, b in p.prior_logit_bias().items():
                logit_bias[prior_slot, token] = b
        self.scales, self.offsets = scales, offsets
        self.logit_bias = logit_bias if self.profiles else None
        self.anchored_slots = {self.slots[f"anchored:{n}"] for n in self.profiles}

    def hooks(self, ctx: ForwardContext) -> tuple[Hook | None, Hook | None]:
        """(head-output hook, MLP-activation hook) for `ctx.bias_slots` ([T] slot ids);
        None for each when no token of the step has an anchored correction."""
        slots = ctx.bias_slots
        if slots is None or not self.anchored_slots:
            return None, None
        if not any(s in self.anchored_slots for s in slots.unique().tolist()):
            return None, None
        scales, offsets = self.scales, self.offsets

        def head_hook(layer: int, h: torch.Tensor) -> torch.Tensor:
            return h + offsets[layer][slots] if layer in offsets else h

        def mlp_hook(layer: int, act: torch.Tensor) -> torch.Tensor:
            return act * scales[layer][slots] if layer in scales else act

        return (head_hook if offsets else None), (mlp_hook if scales else None)

    def adjust_logits(self, logits: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
        """Add each row's prior logit bias (rows of other slots are returned unchanged)."""
        if self.logit_bias is None or not any(
            s and s not in self.anchored_slots for s in row_slots
        ):
            return logits
        index = torch.tensor(row_slots, dtype=torch.long, device=self.logit_bias.device)
        return logits + self.logit_bias[index].to(logits.device, logits.dtype)
