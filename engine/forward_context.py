"""What one forward pass needs besides the token ids: the packed batch layout.

Every forward pass runs on a *packed* batch: the new tokens of all sequences in the step
are concatenated into one flat dimension of length T (a decode contributes 1 token, a
prefill chunk contributes many). `SequenceSlice` says which part of that flat dimension
belongs to which sequence and how many of its tokens were already cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from engine.attention_backend import AttentionBackend


@dataclass
class SequenceSlice:
    """One sequence's share of a packed forward pass."""

    cache: Any  # the backend's per-sequence cache handle
    start: int  # offset of this sequence's first new token in the packed dimension
    num_new: int  # number of new tokens this step
    num_cached: int  # tokens already in the cache; the new tokens have positions from here

    @property
    def end(self) -> int:
        return self.start + self.num_new

    @property
    def total_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass
class ForwardContext:
    """Per-step state shared by every layer of the model."""

    slices: list[SequenceSlice]
    backend: AttentionBackend
    # Per packed token: the length its sequence will have after this step. Used by
    # dynamic-NTK RoPE, whose frequencies depend on the current sequence length.
    seq_len_per_token: torch.Tensor | None = None
    # Hooks applied to per-head attention outputs before o_proj, keyed by name
    # (LoFiT adapters, bias corrections). Each takes (layer, h[T, H, D]) -> h.
    head_output_hooks: list[Any] = field(default_factory=list)
    # Hooks on the MLP's intermediate activations: (layer, act[T, I]) -> act.
    mlp_act_hooks: list[Any] = field(default_factory=list)
    # Per packed token: its sequence's LoFiT bank slot (0 = no adapter), long [T].
    adapter_slots: torch.Tensor | None = None
    # Per packed token: its sequence's bias-correction slot (0 = none), long [T].
    bias_slots: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.slices)

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last new token in the packed dimension."""
        return torch.tensor([s.end - 1 for s in self.slices], dtype=torch.long)
