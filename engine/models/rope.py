"""Rotary position embeddings: inverse frequencies per RoPE type, cos/sin tables, rotation.

The formulas follow transformers' `modeling_rope_utils.py` step by step (same dtypes, same
order of operations) so that our models match its numerics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.model_config import RopeConfig


def _exponents(dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def compute_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32, CPU) and the cos/sin scaling.

    For `dynamic` this is the frequency set used up to max_position_embeddings tokens.
    """
    base = rope.theta
    inv_freq = 1.0 / (base ** _exponents(dim))
    if rope.rope_type in ("default", "dynamic"):
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, inv_freq), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim)
    raise ValueError(f"unsupported RoPE type {rope.rope_type!r}")


def _llama3_inv_freq(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    original = rope.original_max_position_embeddings

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(
                factor, rope.mscale_all_dim
            )
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp

    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


def dynamic_inv_freq(
    rope: RopeConfig, dim: int, max_position_embeddings: int, seq_lens: torch.Tensor
) -> torch.Tensor:
    """Dynamic-NTK inverse frequencies per token [T, dim/2] for sequence lengths [T]."""
    seq_lens = torch.clamp(seq_lens, min=max_position_embeddings)
    factor = rope.factor
    base = rope.theta * ((factor * seq_lens / max_position_embeddings) - (factor - 1)) ** (
        dim / (dim - 2)
    )
    return 1.0 / (base.unsqueeze(1) ** _exponents(dim, seq_lens.device))


class RotaryEmbedding(nn.Module):
    """Cos/sin lookup for packed positions; tables grow on demand."""

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_position_embeddings: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        # Kept in float32 outside the buffers so model.to(dtype) cannot round it.
        self.inv_freq, self.attention_scaling = compute_inv_freq(rope, head_dim)
        empty = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.register_buffer("cos_table", empty, persistent=False)
        self.register_buffer("sin_table", empty.clone(), persistent=False)
        self._build_tables(min(max_position_embeddings, 4096))

    def _build_tables(self, length: int) -> None:
        device = self.cos_table.device
        positions = torch.arange(length, device=device).float()
        inv_freq = self.inv_freq.to(device)
        self.cos_table, self.sin_table = self._cos_sin(positions[:, None] * inv_freq)

    def _cos_sin(self, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width cos and sign-folded sin [N, D] for angles [N, D/2] (see apply_rotary)."""
        cos = freqs.cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return cos.to(self.cos_table.dtype), sin.to(self.cos_table.dtype)

    def forward(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sign-folded sin [T, 1, head_dim] for positions [T].

        `seq_lens` (per token, the sequence's length after this step) matters only for
        dynamic NTK; without it each token's length is taken as its position + 1.
        """
        if self.rope.rope_type == "dynamic":
            seq_lens = positions + 1 if seq_lens is None else seq_lens.to(positions.device)
            if int(seq_lens.max()) > self.max_position_embeddings:
                inv_freq = dynamic_inv_freq(
                    self.rope, self.head_dim, self.max_position_embeddings, seq_lens
                )
                cos, sin = self._cos_sin(positions.float().unsqueeze(1) * inv_freq)
                return cos.unsqueeze(1), sin.unsqueeze(1)
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos_table.shape[0]:
            self._build_tables(max(needed, 2 * self.cos_table.shape[0]))
        return self.cos_table[positions].unsqueeze(1), self.sin_table[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] (half-split layout, as in transformers) by RotaryEmbedding's tables.

    With x = (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + (x2, x1) * (-sin, sin).
    """
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)
