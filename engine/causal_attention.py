"""A cache-free, differentiable attention backend for training over packed batches.

Each sequence of the packed batch attends causally to its own tokens only; nothing is
cached, so every step must contain whole sequences (num_cached == 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.forward_context import ForwardContext


class CausalTrainingAttention:
    """`forward(layer, q, k, v, ctx, scale)` like an AttentionBackend, autograd-friendly."""

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ctx: ForwardContext,
        scale: float,
    ) -> torch.Tensor:
        outs = []
        for s in ctx.slices:
            if s.num_cached:
                raise ValueError("training attention has no cache: pass whole sequences")
            # [n, H, D] -> [1, H, n, D]
            qs, ks, vs = (t[s.start : s.end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
            )
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs, 0)
