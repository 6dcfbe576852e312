"""Reference implementations: one query head at a time, in float64. For tests only."""

from __future__ import annotations

import torch

from kernels.partial_attention import visibility_mask


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query [D] over keys [n, D]: (out [D], lse) in float64; n = 0 gives (0, -inf)."""
    if k.shape[0] == 0:
        return torch.zeros(q.shape[-1], dtype=torch.float64), torch.tensor(float("-inf"))
    scores = scale * (k.double() @ q.double())
    return torch.softmax(scores, 0) @ v.double(), torch.logsumexp(scores, 0)


def partial_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal_offset: int | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.partial_attention.partial_attention`."""
    t, hq, d = q.shape
    hkv, length, _ = k.shape
    g = hq // hkv
    visible = visibility_mask(t, length, causal_offset, mask, torch.device("cpu"))
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    lse = torch.empty(t, hq, dtype=torch.float64)
    for i in range(t):
        keys = torch.arange(length) if visible is None else visible[i].nonzero().flatten()
        for h in range(hq):
            out[i, h], lse[i, h] = _attend(q[i, h], k[h // g, keys], v[h // g, keys], scale)
    return out.float(), lse.float()


def batched_partial_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.partial_attention.batched_partial_attention`."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        mask = None if key_mask is None else key_mask[b].unsqueeze(0)
        o, lse = partial_attention_ref(q[b : b + 1], k[b], v[b], scale, mask=mask)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def gathered_partial_attention_ref(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    idx: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `kernels.partial_attention.gathered_partial_attention`."""
    single = q.dim() == 2
    if single:
        q, idx = q.unsqueeze(0), idx.unsqueeze(0)
    bsz, hq, d = q.shape
    g = hq // k_store.shape[0]
    out = torch.zeros(bsz, hq, d, dtype=torch.float64)
    lse = torch.empty(bsz, hq, dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            rows = idx[b, h][idx[b, h] >= 0]
            out[b, h], lse[b, h] = _attend(
                q[b, h], k_store[h // g, rows], v_store[h // g, rows], scale
            )
    out, lse = out.float(), lse.float()
    return (out[0], lse[0]) if single else (out, lse)
