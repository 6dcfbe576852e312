"""Exact merge of two partial attention results by log-sum-exp weighting."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def merge_partials(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    o1, o2: [..., D]; lse1, lse2: [...] (natural-log sum of exp(scores) of each part).
    A part with lse = -inf (no keys) contributes nothing; if both are empty the result is
    out = 0, lse = -inf. Returns float32 (out, lse).
    """
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"partials do not match: o {tuple(o1.shape)} / {tuple(o2.shape)}, "
            f"lse {tuple(lse1.shape)} / {tuple(lse2.shape)}"
        )
    lse1, lse2 = lse1.float(), lse2.float()
    m = torch.maximum(lse1, lse2)
    m = m.masked_fill(m == NEG_INF, 0.0)
    w1 = torch.exp(lse1 - m)
    w2 = torch.exp(lse2 - m)
    den = w1 + w2
    out = (o1.float() * w1.unsqueeze(-1) + o2.float() * w2.unsqueeze(-1)) / den.clamp_min(
        torch.finfo(torch.float32).tiny
    ).unsqueeze(-1)
    return out, m + torch.log(den)
